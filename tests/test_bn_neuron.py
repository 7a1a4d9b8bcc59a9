"""BatchNorm + neuron as one op (models/bn_neuron.py, ``model.fuse_bn_neuron``): the op against BatchNorm then the
neuron for every neuron variant, layout and mode (batch statistics, running statistics, the cumulative average),
and the whole network fused and unfused under each checkpointing policy. The Triton kernels are checked against
this op's torch path by tools/lif_triton_check.py (on a GPU, or in Triton's interpreter)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from helpers.neurons import FUSED_NEURON_CASES, PLIF_CASES, case_id

from models import _cpu_kernels, create_model
from models import bn_neuron as bn_module
from models.bn_neuron import bn_neuron
from models.checkpointing import BatchNorm
from models.neurons import make_neuron

T, N, C, H, W = 3, 4, 6, 5, 5


def _pair(momentum: float | None = 0.1, affine: bool = True) -> tuple[BatchNorm, BatchNorm]:
    bn = BatchNorm(C, momentum=momentum, affine=affine).double()
    if affine:
        torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
        torch.nn.init.uniform_(bn.bias, -0.3, 0.8)
    bn.running_mean.uniform_(-0.2, 0.2)
    bn.running_var.uniform_(0.5, 2.0)
    return bn, copy.deepcopy(bn)


def _both(x: torch.Tensor, g: torch.Tensor, bn_ref: BatchNorm, bn_fused: BatchNorm, spec: dict, steps: int = 1):
    """(reference, fused) results after ``steps`` forward/backward passes: spikes, x grad, param grads (PLIF's
    rate's last)."""
    out = []
    for bn, fused in ((bn_ref, False), (bn_fused, True)):
        sn = make_neuron(spec)
        if sn.w is not None:
            sn.w.data.fill_(0.4)  # a rate other than the initial 1/tau
        for _ in range(steps):
            xi = x.clone().requires_grad_()
            bn.zero_grad(set_to_none=True)
            sn.zero_grad(set_to_none=True)
            s = bn_neuron(xi, bn, sn) if fused else sn(bn(xi.flatten(0, 1)).unflatten(0, (T, N)))
            (s * g).sum().backward()
        out.append((s.detach(), xi.grad, [p.grad for p in [*bn.parameters(), *sn.parameters()]]))
    return out


@pytest.mark.parametrize("case", FUSED_NEURON_CASES + PLIF_CASES, ids=case_id)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_the_op_equals_batchnorm_then_the_neuron(case, mode):
    torch.manual_seed(0)
    x = torch.randn(T, N, C, H, W, dtype=torch.float64) * 1.5 + 0.7
    g = torch.randn(T, N, C, H, W, dtype=torch.float64)
    bn_ref, bn_fused = _pair()
    bn_ref.train(mode == "train")
    bn_fused.train(mode == "train")
    (s1, gx1, gp1), (s2, gx2, gp2) = _both(x, g, bn_ref, bn_fused, case, steps=2)
    assert torch.equal(s1, s2)
    assert s1.sum() > 0 and (s1 == 0).any()  # spikes and silence both occur, so the comparison means something
    torch.testing.assert_close(gx2, gx1, rtol=1e-9, atol=1e-12)
    for a, b in zip(gp2, gp1, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    for name, buf in bn_ref.named_buffers():
        torch.testing.assert_close(dict(bn_fused.named_buffers())[name], buf, rtol=1e-12, atol=1e-14, msg=name)


@pytest.mark.parametrize("layout", ["channels_last", "slice"])
def test_the_op_keeps_the_layout_and_takes_strided_input(layout):
    torch.manual_seed(1)
    x = torch.randn(T, N, C, H, W, dtype=torch.float64) + 0.8
    if layout == "channels_last":
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (T, N))
    else:
        x = torch.cat([x, x], 2)[:, :, 1 : 1 + C]
    g = torch.randn(T, N, C, H, W, dtype=torch.float64)
    (s1, gx1, gp1), (s2, gx2, gp2) = _both(x, g, *_pair(), {})
    assert torch.equal(s1, s2)
    torch.testing.assert_close(gx2, gx1, rtol=1e-9, atol=1e-12)
    if layout == "channels_last":  # outputs and gradients stay channels_last (no hidden conversion)
        assert s2[0].is_contiguous(memory_format=torch.channels_last)
        assert gx2[0].is_contiguous(memory_format=torch.channels_last)


def test_cumulative_average_and_no_affine():
    """momentum=None (the cumulative average over batches) and affine=False follow nn.BatchNorm2d."""
    torch.manual_seed(2)
    x = torch.randn(T, N, C, H, W, dtype=torch.float64) + 0.8
    g = torch.randn(T, N, C, H, W, dtype=torch.float64)
    bn_ref, bn_fused = _pair(momentum=None, affine=False)
    (s1, gx1, _), (s2, gx2, _) = _both(x, g, bn_ref, bn_fused, {}, steps=3)
    assert torch.equal(s1, s2)
    torch.testing.assert_close(gx2, gx1, rtol=1e-9, atol=1e-12)
    assert int(bn_fused.num_batches_tracked) == 3
    torch.testing.assert_close(bn_fused.running_var, bn_ref.running_var, rtol=1e-12, atol=1e-14)


def test_one_value_per_channel_is_refused_in_training():
    bn, _ = _pair()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn_neuron(torch.randn(1, 1, C, 1, 1, dtype=torch.float64), bn, make_neuron(None))


def test_the_reference_backend_runs_unfused(monkeypatch):
    """The reference neuron (the autograd loop, for checking) takes BatchNorm then the neuron, with the same result
    as calling them; PLIF runs the op."""
    calls = []
    real = bn_module._forward
    monkeypatch.setattr(bn_module, "_forward", lambda *a: calls.append(a[3].type) or real(*a))
    torch.manual_seed(3)
    x = torch.randn(T, N, C, H, W, dtype=torch.float64) + 0.8
    for spec in (dict(type="plif"), dict(backend="reference")):
        bn_a, bn_b = _pair()
        sn = make_neuron(spec).double()
        want = sn(bn_a(x.flatten(0, 1)).unflatten(0, (T, N)))
        torch.testing.assert_close(bn_neuron(x, bn_b, sn), want)
    assert calls == ["plif"]


@pytest.mark.parametrize("name,da,neuron", [("danet18", None, None), ("danet18", {"domain": "spike", "span": "stage"}, None),
                                            ("sew_resnet18", None, None), ("danet18", None, {"type": "plif"})])  # fmt: skip
def test_network_fused_and_unfused(name, da, neuron, monkeypatch):
    """Outputs, every gradient and every buffer after two steps agree to rounding (float64), under each
    checkpointing policy; with ``fuse_bn_neuron`` off the network is the one it always was, on every BatchNorm
    that feeds a neuron runs fused."""
    calls = []
    real = bn_module._forward
    monkeypatch.setattr(bn_module, "_forward", lambda *a: calls.append(1) or real(*a))
    kw = dict(T=2, num_classes=10, width=8, input_size=32) | ({"da": da} if da else {}) | (
        {"neuron": neuron} if neuron else {})
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
    for policy in ("none", "time", "block", "block_time"):
        torch.manual_seed(0)
        base = create_model(name, checkpointing=policy, **kw).double()
        results = []
        for fuse in (False, True):
            model = copy.deepcopy(base)
            model.fuse_bn_neuron = fuse
            calls.clear()
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                out = model(x)
                torch.nn.functional.cross_entropy(out.mean(0), y).backward()
            results.append((out.detach(), [p.grad for p in model.parameters()], model.state_dict()))
            assert (len(calls) > 0) == fuse, policy
        (o1, g1, st1), (o2, g2, st2) = results
        torch.testing.assert_close(o2, o1, rtol=1e-9, atol=1e-11, msg=policy)
        for a, b in zip(g2, g1, strict=True):
            assert ((a - b).norm() / b.norm().clamp_min(1e-300)).item() <= 1e-8, policy
        for k in st1:
            torch.testing.assert_close(st2[k], st1[k], rtol=1e-10, atol=1e-12, msg=f"{policy} {k}")


def test_the_option_is_validated_and_reaches_the_blocks():
    model = create_model("danet18", T=2, num_classes=4, width=4, input_size=16, fuse_bn_neuron=True)
    assert model.fuse_bn_neuron is True and all(b.fuse_bn_neuron is True for s in model.stages for b in s.branches)
    model.fuse_bn_neuron = "auto"
    assert all(b.fuse_bn_neuron == "auto" for s in model.stages for b in s.branches)
    assert create_model("danet18").fuse_bn_neuron == "auto"  # the default
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match=f"fuse_bn_neuron={bad!r}: expected true, false or 'auto'"):
            create_model("danet18", fuse_bn_neuron=bad)
    with pytest.raises(ValueError, match="expected true, false or 'auto'"):
        model.fuse_bn_neuron = "on"


@pytest.mark.skipif(_cpu_kernels.library() is None, reason="no C++ CPU kernels here")
def test_auto_fuses_where_the_kernels_take_the_input(monkeypatch):
    """``fuse_bn_neuron: auto`` runs the op where it is measured faster, the CPU kernels (NCHW float32 / float64),
    and the pair elsewhere: with the kernels switched off, and for channels_last activations. Each way the
    network computes what the pair computes."""
    calls = []
    real = bn_module._forward
    monkeypatch.setattr(bn_module, "_forward", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    base = create_model("sew_resnet18", T=2, num_classes=10, width=8, input_size=32).double()
    x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])

    def step(mode, channels_last=False, kernels=True):
        model = copy.deepcopy(base)
        model.fuse_bn_neuron = mode
        xi = x
        if channels_last:
            model, xi = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        calls.clear()
        with contextlib.nullcontext() if kernels else _cpu_kernels.disabled():
            out = model(xi)
            torch.nn.functional.cross_entropy(out.mean(0), y).backward()
        return len(calls), out.detach(), [p.grad for p in model.parameters()]

    n_pair, out_pair, g_pair = step(False)
    assert n_pair == 0
    for kw, fused in (({}, True), ({"kernels": False}, False), ({"channels_last": True}, False)):
        n, out, grads = step("auto", **kw)
        assert (n > 0) == fused, kw
        torch.testing.assert_close(out, out_pair, rtol=1e-9, atol=1e-11, msg=str(kw))
        for a, b in zip(grads, g_pair, strict=True):
            assert ((a - b).norm() / b.norm().clamp_min(1e-300)).item() <= 1e-8, kw


def test_the_plan_sizes_what_the_gpu_runs():
    """``orchestrator plan`` probes the model on CPU, where ``auto`` fuses; it sizes the GPU's job, where ``auto``
    runs the pair until measured (``AUTO_ON_CUDA``): the estimate for auto is the unfused one, and fusing saves
    memory (the membrane is not kept), so the difference is visible."""
    from orchestrator.config.load import load_config
    from orchestrator.plan import activation_bytes

    def acts(mode: str) -> dict[str, int]:
        return activation_bytes(load_config("digits", [f"model.fuse_bn_neuron={mode}", "model.width=8"]))[0]

    auto, off, on = acts("auto"), acts("false"), acts("true")
    assert not bn_module.AUTO_ON_CUDA
    assert auto == off
    assert on["none"] < off["none"]
