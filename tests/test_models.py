"""Models: every registered model end to end, neurons against their reference, DA identities, sizes, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.neurons import FUSED_NEURON_CASES, PLIF_CASES, case_id

from models import Connection, MultiStepNeuron, NeuronSpec, create_model, model_names
from models.lif_fused import fused_lif
from models.telemetry import measure

torch.set_num_threads(2)


def _small(name: str, **kw):
    kw = {"T": 2, "num_classes": 10, "input_size": 32, "width": 8, **kw}
    return create_model(name, **kw)


@pytest.mark.parametrize("name", model_names())
def test_every_model_forward_backward(name):
    torch.manual_seed(0)
    model = _small(name)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2, 10)
    assert torch.isfinite(out).all()
    out.mean(0).logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ neurons

NEURON_CASES = [*FUSED_NEURON_CASES, *PLIF_CASES]


def _inputs(shape=(5, 3, 4, 6, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 1.5 + 0.6, torch.randn(shape, generator=g)


@pytest.mark.parametrize("case", NEURON_CASES, ids=case_id)
@pytest.mark.parametrize("backend", ["fused", "reference"])
def test_multistep_equals_single_steps(case, backend):
    neuron = MultiStepNeuron(NeuronSpec(**case, backend=backend))
    x, _ = _inputs()
    spikes, v_last = neuron.forward_with_state(x)
    v, loop = None, []
    for t in range(x.shape[0]):
        s, v = neuron.step(x[t], v)
        loop.append(s)
    assert torch.equal(spikes, torch.stack(loop))
    assert torch.allclose(v_last, v, atol=1e-6)
    assert 0.05 < spikes.mean() < 0.95  # the inputs exercise both branches


@pytest.mark.parametrize("case", NEURON_CASES, ids=case_id)
@pytest.mark.parametrize("with_v0", [False, True])
def test_fused_lif_equals_reference_loop(case, with_v0):
    """Spikes equal, the final membrane and every gradient (PLIF's learnable w included) to rounding."""
    x, g = _inputs()
    v0 = (torch.rand(x.shape[1:]) * 0.5) if with_v0 else None
    outs = {}
    for backend in ("fused", "reference"):
        xb = x.clone().requires_grad_()
        vb = v0.clone().requires_grad_() if v0 is not None else None
        neuron = MultiStepNeuron(NeuronSpec(**case, backend=backend))
        if neuron.w is not None:
            neuron.w.data.fill_(0.4)  # a rate other than the initial 1/tau
        spikes, v_last = neuron.forward_with_state(xb, vb)
        (spikes * g).sum().add_((v_last * g[0]).sum()).backward()
        outs[backend] = (spikes, v_last, xb.grad, vb.grad if vb is not None else None,
                         neuron.w.grad if neuron.w is not None else None)
    fused, ref = outs["fused"], outs["reference"]
    assert torch.equal(fused[0], ref[0])
    for a, b in zip(fused[1:], ref[1:], strict=True):
        if b is None:
            assert a is None
        else:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-6), (a - b).abs().max()


def test_fused_lif_accepts_broadcast_time_input():
    x = torch.randn(1, 2, 3, 4, 4).expand(4, 2, 3, 4, 4) + 0.8
    spikes, _ = fused_lif(x, None, NeuronSpec())
    ref = MultiStepNeuron(NeuronSpec(backend="reference"))(x.contiguous())
    assert torch.equal(spikes, ref)


def test_neuron_state_is_not_kept_between_calls():
    model = _small("danet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    assert not any("v" == n.split(".")[-1] for n, _ in model.named_buffers())


def test_neuron_spec_errors():
    with pytest.raises(ValueError, match="surrogate"):
        NeuronSpec(surrogate="tanh")
    with pytest.raises(ValueError, match="unknown field"):
        create_model("danet18", neuron={"taus": 2.0})


# ------------------------------------------------------------------------------------------------ connections


def _same_weights(src, dst):
    dst.load_state_dict(src.state_dict(), strict=True)
    return dst


@pytest.mark.parametrize(
    "domain,baseline,depth", [("membrane", "ms_resnet", 18), ("spike", "sew_resnet", 50)]
)
def test_da_fixed_stage_is_the_identity_residual_stream(domain, baseline, depth):
    torch.manual_seed(0)
    base = _small(f"{baseline}{depth}").train()
    da = _same_weights(
        base, _small(f"danet{depth}", da={"domain": domain, "span": "stage", "weights": "fixed"})
    )
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(base(x), da(x))


@pytest.mark.parametrize("domain,span", list(itertools.product(["spike", "membrane"], ["stage", "network"])))
def test_da_learnable_at_init_equals_fixed(domain, span):
    torch.manual_seed(0)
    learn = _small("danet34", da={"domain": domain, "span": span, "weights": "learnable"})
    fixed = _small("danet34", da={"domain": domain, "span": span, "weights": "fixed"})
    state = {k: v for k, v in learn.state_dict().items() if not k.endswith("weights.alpha")}
    fixed.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(learn(x), fixed(x))


def test_connection_override_and_iand():
    model = _small("sew_resnet18", connection="sew_iand")
    assert model.connection is Connection.SEW_IAND
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2, 10)
    assert _small("sew_resnet18", connection="default").connection is Connection.SEW_ADD


# ------------------------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("name,params_m", [("sew_resnet50", 25.56), ("sew_resnet152", 60.19)])
def test_reference_parameter_counts(name, params_m):
    with torch.device("meta"):
        model = create_model(name, num_classes=1000)
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - params_m) <= 0.01


def test_registry_names_and_errors():
    names = model_names()
    for family in ("danet", "spiking_resnet", "sew_resnet", "ms_resnet"):
        for depth in (18, 34, 50, 101, 152):
            assert f"{family}{depth}" in names
    with pytest.raises(ValueError, match="valid names: .*danet18"):
        create_model("danet19")
    with pytest.raises(ValueError, match="unknown override.*widht.*valid"):
        create_model("danet18", widht=8)
    with pytest.raises(ValueError, match="connection='dense'"):
        create_model("danet18", connection="dense")
    with pytest.raises(ValueError, match="da.span"):
        create_model("danet18", da={"span": "everything"})
    with pytest.raises(ValueError, match="T=0"):
        create_model("danet18", T=0)


def test_imagenet_stem_and_sequence_input():
    model = _small("danet18", input_size=112)
    assert model.stem_pool is not None
    assert model(torch.randn(1, 3, 112, 112)).shape == (2, 1, 10)
    assert model(torch.randn(2, 1, 3, 112, 112)).shape == (2, 1, 10)


def test_model_cost_for_the_listing():
    from models.registry import model_cost

    cost = model_cost("sew_resnet50")
    assert abs(cost["params_m"] - 25.557) < 1e-3
    assert 4.0 < cost["gflops"] < 4.2  # ResNet-50's 4.1 GMACs per time step


# ------------------------------------------------------------------------------------------------ checkpointing


@pytest.mark.parametrize("policy", ["block", "time"])
def test_checkpointing_matches_none(policy):
    torch.manual_seed(0)
    ref = _small("danet18", width=8)
    ckpt = _same_weights(ref, _small("danet18", width=8, checkpointing=policy))
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, ckpt):
        m(x).mean(0).logsumexp(1).sum().backward()
    for (n, a), b in zip(ref.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n
    for (n, a), b in zip(ref.named_buffers(), ckpt.buffers(), strict=True):
        assert torch.equal(a, b), n  # running statistics updated once, as without checkpointing


# ------------------------------------------------------------------------------------------------ telemetry


@pytest.mark.parametrize("fuse", [False, "auto", True])
def test_telemetry_measure(fuse):
    """Every neuron's spikes are counted whether BatchNorm + neuron run fused or not (the same rates), and the
    model's setting is left as it was."""
    model = _small("sew_resnet18").train()
    model.fuse_bn_neuron = fuse
    stats = measure(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert model.training and model.fuse_bn_neuron == fuse
    model.fuse_bn_neuron = False
    unfused = measure(model, torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    assert stats == unfused
    for key in ("firing_rate/stage1", "firing_rate/stage4", "firing_rate/mean", "sops", "energy_mj"):
        assert isinstance(stats[key], float)
    assert 0.0 <= stats["firing_rate/mean"] <= 1.0
    assert stats["sops"] > 0 and stats["energy_mj"] > 0
    assert stats["macs"] > 0  # the stem convolves the image: MACs


@pytest.mark.parametrize("storage", ["byte", "bit"])
def test_spike_storage_gives_identical_gradients(storage):
    torch.manual_seed(0)
    ref = _small("danet18")
    packed = _same_weights(ref, _small("danet18", spike_storage=storage))
    x = torch.randn(2, 3, 32, 32)
    for m in (ref, packed):
        m(x).mean(0).logsumexp(1).sum().backward()
    for (n, a), b in zip(ref.named_parameters(), packed.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), n


def test_pack_unpack_spikes_roundtrip():
    from models.checkpointing import pack_spikes, unpack_spikes

    x = (torch.rand(3, 5, 7, 3) > 0.6).float().contiguous(memory_format=torch.channels_last)
    for storage in ("byte", "bit"):
        packed = pack_spikes(x, storage)
        assert packed.numel() == (x.numel() if storage == "byte" else -(-x.numel() // 8))
        back = unpack_spikes(packed, storage, torch.empty_like(x, device="meta"))
        assert torch.equal(back, x) and back.stride() == x.stride()


@pytest.mark.parametrize("policy", ["none", "block"])
def test_dense_aggregate_backward_matches_plain_autograd(policy, monkeypatch):
    """The stage-wide DA backward (g_l stashed, one gradient per y) equals autograd's addcmul chain."""
    import copy

    from helpers.dense import dense_danet, outputs_and_grads, step_batch

    from models.connections import DenseWeights

    net = dense_danet(policy, width=8)
    x, y = step_batch()
    plain = copy.deepcopy(net)
    out, g = outputs_and_grads(net, x, y)
    original = DenseWeights.aggregate
    monkeypatch.setattr(DenseWeights, "aggregate", lambda self, base, ys, stash=None: original(self, base, ys))
    out_ref, g_ref = outputs_and_grads(plain, x, y)
    assert torch.equal(out, out_ref)
    for name in g:
        scale = g_ref[name].abs().max().clamp_min(1e-12)
        assert (g[name] - g_ref[name]).abs().max() / scale < 5e-5, name  # fp32 summation order only


# ------------------------------------------------------------------------------------------------ memory layout

# (model, overrides, whether the weights are channels_last too): the training job keeps parameters contiguous
# (DeepSpeed's flat buffers) and makes the images channels_last, which every convolution then follows
LAYOUT_CASES = [
    ("danet18", {}, False),  # membrane domain, network span: broadcast stem into projections and the DA sums
    ("danet18", {"da": {"domain": "spike", "span": "stage", "weights": "learnable"}, "spike_storage": "bit"}, True),
    ("spiking_resnet18", {"neuron": {"type": "plif"}}, False),  # the fused neuron with a learnable rate
    ("spiking_resnet18", {"neuron": {"backend": "reference"}}, False),  # the reference (autograd) neuron loop
]


def _nhwc(t: torch.Tensor) -> bool | None:
    """Whether an activation (or its gradient) is channels_last per step; None where layout is moot."""
    if t.dim() == 5:
        t = t[0]
    if t.dim() != 4 or t.shape[1] == 1 or t.shape[2] * t.shape[3] == 1:
        return None
    return t.is_contiguous(memory_format=torch.channels_last)


class _LayoutWatch(torch.utils._python_dispatch.TorchDispatchMode):
    """Every aten op of a forward + backward: convolutions and BatchNorm must see channels_last activations only,
    and no op may turn a channels_last activation into an NCHW one (a hidden layout conversion). Tensors shaped
    like a parameter (weights, their gradients being accumulated) are not activations."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.param_shapes = {tuple(p.shape) for p in model.parameters()}
        self.heavy, self.problems = 0, []

    def _activations(self, tree) -> list[torch.Tensor]:
        from torch.utils._pytree import tree_flatten

        return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)
                and tuple(t.shape) not in self.param_shapes]  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func)
        ins, outs = self._activations((args, kwargs)), self._activations(out)
        if "convolution" in name or "batch_norm" in name:
            self.heavy += 1
            if any(_nhwc(t) is False for t in ins + outs):
                self.problems.append(f"{name} sees NCHW")
        elif "permute" not in name and "stack" not in name:  # stack_like stacks NHWC-permuted views on purpose
            if any(_nhwc(t) for t in ins) and any(_nhwc(t) is False and t.stride(0) != 0 for t in outs):
                self.problems.append(f"{name}: channels_last in, NCHW out")
        return out


@pytest.mark.parametrize("name,overrides,cl_weights", LAYOUT_CASES,
                         ids=["danet18", "danet18-spike-stage-bit-clweights", "plif", "reference-loop"])
def test_channels_last_same_results_and_stays_channels_last(name, overrides, cl_weights):
    # float64: the NHWC convolutions sum in another order, which fp32 shows at ~1e-5; in float64 any real
    # difference (a misplaced element, a lost gradient) stands out by orders of magnitude
    torch.manual_seed(0)
    ref = _small(name, **overrides).double()
    cl = _same_weights(ref, _small(name, **overrides).double())
    if cl_weights:
        cl = cl.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    watch = _LayoutWatch(cl)
    out_ref = ref(x)
    out_ref.square().mean().backward()
    with watch:
        out_cl = cl(x.contiguous(memory_format=torch.channels_last))
        out_cl.square().mean().backward()
    assert watch.heavy > 20 and not watch.problems, watch.problems[:5]
    torch.testing.assert_close(out_cl, out_ref, rtol=1e-10, atol=1e-12)
    for (n, a), b in zip(ref.named_parameters(), cl.parameters(), strict=True):
        rel = ((a.grad - b.grad).norm() / a.grad.norm().clamp_min(1e-300)).item()
        assert rel <= 1e-10, f"{n}: rel err {rel:.2e}"


def test_fused_lif_outputs_keep_the_input_layout():
    """Any layout in (NCHW, channels_last, broadcast over T, a slice), the same values out, in that layout."""
    from helpers.layouts import sequence_layouts

    from models.layout import empty_seq_like

    layouts = sequence_layouts(torch.randn(4, 3, 5, 6, 7) * 1.5 + 0.6)
    g = torch.randn(4, 3, 5, 6, 7)
    for label, x in layouts.items():
        x = x.detach().requires_grad_()
        spikes, v = fused_lif(x, None, NeuronSpec())
        (spikes * g).sum().backward()
        xr = x.detach().contiguous().requires_grad_()
        ref = MultiStepNeuron(NeuronSpec(backend="reference"))(xr)
        (ref * g).sum().backward()
        assert torch.equal(spikes, ref), label
        torch.testing.assert_close(x.grad, xr.grad, rtol=1e-6, atol=1e-6, msg=label)
        assert spikes.stride() == empty_seq_like(x).stride(), label
        assert v.stride() == spikes[0].stride(), label
    cl = layouts["channels_last"]
    assert fused_lif(cl, None, NeuronSpec())[0][1].is_contiguous(memory_format=torch.channels_last)


def test_models_import_with_torch_alone_and_without_circles():
    """models/ imports torch and the standard library only; no module imports one that imports it back,
    at module level or inside a function (DEVELOPERS: neurons/lif_fused/_lif_triton, resnet/checkpointing)."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, torch; before = set(sys.modules); import models, models.registry, models.telemetry, "
             "models.checkpointing, models.layout, models.lif_fused; "
             "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
             "print(sorted(new - set(sys.stdlib_module_names) - {'models', 'torch'}))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout

    root = Path(__file__).resolve().parents[1] / "models"
    edges: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps |= {node.module} if node.module else {a.name for a in node.names}
        edges[path.stem] = {d.split(".")[0] for d in deps}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for d in edges.get(start, ()):
            if d == target or (d not in seen and reaches(d, target, seen | {d})):
                return True
        return False

    circles = sorted(m for m in edges if reaches(m, m, set()))
    assert not circles, f"import circles through {circles}"
    assert "neuron_spec" in edges["lif_fused"] and "neurons" not in edges["lif_fused"]


def _triton_env(**extra: str) -> dict:
    """The environment the Triton tools run in: this interpreter's own triton where it has one (the GPU
    machine's, in tools/gpu_stack_check.sh), else ``make triton-check``'s folder (triton is not part of the CPU
    stack); skipped where neither exists."""
    import importlib.util
    import os
    from pathlib import Path

    site = Path(__file__).resolve().parents[1] / ".cache" / "triton_site"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | extra
    if importlib.util.find_spec("triton") is None:
        if not (site / "triton").is_dir():
            pytest.skip("no triton here: `make triton-check` installs one for these checks")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.slow
def test_triton_lif_kernels_in_the_interpreter():
    """The Triton kernels against the torch paths for every layout (tools/lif_triton_check.py), run on CPU by
    Triton's interpreter (the GPU script runs the same check on the real kernels)."""
    import subprocess
    import sys
    from pathlib import Path

    env = _triton_env(TRITON_INTERPRET="1")
    tool = Path(__file__).resolve().parents[1] / "tools" / "lif_triton_check.py"
    r = subprocess.run([sys.executable, str(tool)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "0 failures" in r.stdout, (r.stdout + r.stderr)[-3000:]


@pytest.mark.slow
def test_triton_kernels_compile_for_the_h200():
    """Every Triton kernel, at the launches the interpreter check makes, compiles for sm_90 with the ptxas Triton
    ships (tools/triton_compile_check.py; no GPU needed) and spills nothing."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    env = _triton_env()
    tool = Path(__file__).resolve().parents[1] / "tools" / "triton_compile_check.py"
    r = subprocess.run([sys.executable, str(tool)], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and ", 0 failures" in r.stdout, (r.stdout + r.stderr)[-3000:]
    for kernel in ("_lif_fwd", "_bn_lif_bwd", "_weighted_sum_dots"):
        assert f".{kernel}(" in r.stdout
    assert "_lif_bwd(T=3, HAS_GV=True, HARD=True, DETACH=True, SURROGATE=0, LEARN=True" in r.stdout  # PLIF's
    assert not re.search(r"(stack|local) [1-9]", r.stdout), r.stdout  # register spills


def test_plif_trains_on_the_fused_op():
    """A PLIF network keeps for backward what the LIF one does (one h per neuron, not the reference loop's graph of
    every step) plus its scalar rates, and its learnable rates get gradients."""
    from models.checkpointing import saved_activation_bytes

    kw = dict(T=2, num_classes=10, width=8, input_size=32)
    saved = {t: saved_activation_bytes(create_model("danet18", neuron={"type": t}, **kw), "none", res=32)
             for t in ("lif", "plif")}  # fmt: skip
    reference = saved_activation_bytes(
        create_model("danet18", neuron={"type": "plif", "backend": "reference"}, **kw), "none", res=32)
    model = create_model("danet18", neuron={"type": "plif"}, **kw)
    neurons = sum(isinstance(m, MultiStepNeuron) for m in model.modules())
    assert saved["lif"] <= saved["plif"] <= saved["lif"] + 8 * neurons < 0.8 * reference, (saved, reference)
    model(torch.randn(2, 3, 32, 32)).mean(0).logsumexp(1).sum().backward()
    rates = [m.w for m in model.modules() if isinstance(m, MultiStepNeuron)]
    assert rates and all(w.grad is not None and w.grad.abs() > 0 for w in rates)
