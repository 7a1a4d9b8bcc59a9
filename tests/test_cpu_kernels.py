"""The models' C++ CPU kernels (models/_cpu_kernels.py): each against the torch path it replaces, for every
neuron variant, dtype and layout; the BatchNorm's running statistics; the build (cache key, concurrent ranks, a
failing compiler, the switch) and the whole network with the kernels on and off."""

from __future__ import annotations

import contextlib
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.layouts import sequence_layouts
from helpers.neurons import FUSED_NEURON_CASES, PLIF_CASES, case_id
from torch import nn

from models import _cpu_kernels, create_model
from models import bn_neuron as bn_module
from models.checkpointing import BatchNorm
from models.layout import empty_seq_like
from models.lif_fused import backward_vectorised, forward_vectorised, plif_rate
from models.neuron_spec import NeuronSpec

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(_cpu_kernels._compiler() is None, reason="no C++ compiler on this machine")



def test_the_kernels_build_and_load_here():
    """On a machine with a compiler (this one, CI's) the kernels are in use, not silently replaced."""
    assert _cpu_kernels.library() is not None, _cpu_kernels.why()
    assert _cpu_kernels.applies(torch.zeros(2))
    assert not _cpu_kernels.applies(torch.zeros(2, dtype=torch.bfloat16))  # bf16: the torch path
    with _cpu_kernels.disabled():
        assert not _cpu_kernels.applies(torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", FUSED_NEURON_CASES + PLIF_CASES, ids=case_id)
def test_lif_kernel_equals_the_vectorised_path(case, dtype):
    """Spikes equal; membranes and gradients (PLIF's rate's too) to rounding; with and without an initial
    membrane and a gradient on the final one; a step large enough to be split across threads and one smaller
    than a block."""
    spec = NeuronSpec(**case)
    k = plif_rate(torch.tensor(0.4), dtype) if spec.type == "plif" else None
    g = torch.Generator().manual_seed(0)
    for shape in [(5, 3, 4, 6, 6), (4, 4, 64, 28, 28)]:
        x = (torch.randn(shape, generator=g) * 1.5 + 0.6).to(dtype)
        grad = torch.randn(shape, generator=g).to(dtype)
        v0 = (torch.rand(shape[1:], generator=g) * 0.5).to(dtype)
        g_v = torch.randn(shape[1:], generator=g).to(dtype)
        for v in (None, v0):
            s_k, v_k, h_k = _cpu_kernels.forward(x, v, spec, k)
            s_t, v_t, h_t = forward_vectorised(x, v, spec, k)
            assert 0.05 < s_t.mean() < 0.95  # both branches exercised
            assert torch.equal(s_k, s_t)
            torch.testing.assert_close(h_k, h_t, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(v_k, v_t, rtol=1e-6, atol=1e-7)
            for gv in (None, g_v):
                gx_k, gv0_k, gk_k = _cpu_kernels.backward(grad, gv, h_k, spec, k, v)
                gx_t, gv0_t, gk_t = backward_vectorised(grad, gv, h_t, spec, k, v)
                torch.testing.assert_close(gx_k, gx_t, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(gv0_k, gv0_t, rtol=1e-5, atol=1e-6)
                if k is None:
                    assert gk_k is None and gk_t is None
                else:  # a sum over up to 1.2 M terms: fp32 summation order shows at ~1e-6 of it
                    assert gk_k.shape == () and gk_k.dtype == k.dtype
                    torch.testing.assert_close(gk_k, gk_t, rtol=1e-4, atol=1e-4)


def test_lif_kernel_keeps_every_layout():
    """NCHW, channels_last, broadcast over T (no copy), broadcast channels_last, a slice (copied): the same
    values as the torch path on a contiguous copy, outputs in the input's step layout."""
    layouts = sequence_layouts(torch.randn(4, 3, 5, 6, 7) * 1.5 + 0.6)
    grad = torch.randn(4, 3, 5, 6, 7)
    spec = NeuronSpec()
    for label, x in layouts.items():
        s_k, v_k, h_k = _cpu_kernels.forward(x, None, spec)
        s_t, v_t, h_t = forward_vectorised(x.contiguous(), None, spec)
        assert torch.equal(s_k, s_t), label
        assert s_k.stride() == h_k.stride() == empty_seq_like(x).stride(), label
        assert v_k.stride() == s_k[0].stride(), label
        for g in (grad, grad.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (4, 3))):
            gx_k, _, _ = _cpu_kernels.backward(g, None, h_k, spec)
            gx_t, _, _ = backward_vectorised(g.contiguous(), None, h_t, spec)
            torch.testing.assert_close(gx_k.contiguous(), gx_t, rtol=1e-6, atol=1e-6, msg=label)
            assert gx_k.stride() == h_k.stride(), label
    tie = torch.full((2, 3, 8), 2.0)  # h = x / tau = 1.0 = v_threshold exactly: a spike (h >= threshold)
    assert torch.equal(_cpu_kernels.forward(tie, None, spec)[0], forward_vectorised(tie, None, spec)[0])
    assert _cpu_kernels.forward(tie, None, spec)[0][0].eq(1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batchnorm_kernel_equals_torch_batchnorm(dtype, momentum, monkeypatch):
    """Outputs, every gradient, running statistics and the batch counter over three steps, against
    nn.BatchNorm2d; channels_last and eval mode stay on torch's kernel."""
    # 1x1 maps with 4 values per channel: with 2 (the first version of this test) the input gradient is exactly
    # zero, both sides return rounding noise scaled by invstd, and a close pair of draws failed it now and then
    torch.manual_seed(0)
    calls = []
    original = _cpu_kernels.batch_norm_train
    monkeypatch.setattr(_cpu_kernels, "batch_norm_train", lambda *a: calls.append(1) or original(*a))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-12)
    for shape in [(16, 64, 28, 28), (3, 5, 4, 4), (4, 7, 1, 1)]:
        ours, ref = BatchNorm(shape[1], momentum=momentum).to(dtype), torch.nn.BatchNorm2d(shape[1], momentum=momentum)
        ref = ref.to(dtype)
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            ours.bias.uniform_(-1, 1)
        ref.load_state_dict(ours.state_dict())
        for _ in range(3):
            x = (torch.randn(shape, dtype=dtype) * 2 + 0.7).requires_grad_()
            xr = x.detach().clone().requires_grad_()
            g = torch.randn(shape, dtype=dtype)
            y, yr = ours(x), ref(xr)
            torch.testing.assert_close(y, yr, **tol)
            (y * g).sum().backward()
            (yr * g).sum().backward()
            torch.testing.assert_close(x.grad, xr.grad, **tol)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=tol["rtol"], atol=1e-3)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=tol["rtol"], atol=1e-3)
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    assert len(calls) == 9  # the kernel ran every training step
    bn = BatchNorm(8).to(dtype)
    bn(torch.randn(4, 8, 5, 5, dtype=dtype).contiguous(memory_format=torch.channels_last))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # torch's refusal, unchanged
        bn(torch.randn(1, 8, 1, 1, dtype=dtype))
    bn.eval()(torch.randn(4, 8, 5, 5, dtype=dtype))
    assert len(calls) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", FUSED_NEURON_CASES + PLIF_CASES, ids=case_id)
def test_bn_neuron_kernels_equal_the_torch_path(case, dtype):
    """BatchNorm + neuron as one op (models/bn_neuron.py) through the kernels against the op's torch path, on the
    same per-channel numbers: statistics (against float64's), spikes equal, and g_x, the sums that are
    BatchNorm's weight and bias gradients and PLIF's g_k to rounding of the torch path in float64, with batch
    and with running statistics. Rows shorter than a block and
    rows across blocks (hw 25), rows of several blocks (hw 576), a step split across threads."""
    spec = NeuronSpec(**case)
    k = plif_rate(torch.tensor(0.4), dtype) if spec.type == "plif" else None
    g = torch.Generator().manual_seed(0)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for shape in [(3, 4, 6, 5, 5), (2, 2, 3, 24, 24), (4, 4, 64, 16, 16)]:
        x = (torch.randn(shape, generator=g) * 1.5 + 0.6).to(dtype)
        grad = torch.randn(shape, generator=g).to(dtype)
        weight = (torch.rand(shape[2], generator=g) + 1.0).to(dtype)
        bias = (torch.rand(shape[2], generator=g) + 0.6).to(dtype)
        bn = nn.BatchNorm2d(shape[2], momentum=0.3, dtype=dtype)
        with torch.no_grad():
            bn.weight.copy_(weight), bn.bias.copy_(bias), bn.running_mean.uniform_(), bn.running_var.uniform_(1, 2)
        assert _cpu_kernels.bn_neuron_applies(x) and _cpu_kernels.batch_stats_apply(x, bn)
        ref = copy.deepcopy(bn)
        mean, var, invstd, scale, shift = _cpu_kernels.batch_stats(x, bn, 0.3)  # the running statistics updated
        var_t, mean_t = torch.var_mean(x.double(), dim=(0, 1, 3, 4), correction=0)
        torch.testing.assert_close(mean, mean_t.to(dtype), **tol)
        torch.testing.assert_close(var, var_t.to(dtype), **tol)
        torch.testing.assert_close(invstd, torch.rsqrt(var_t + 1e-5).to(dtype), **tol)
        for got, want in zip((scale, shift), bn_module._affine(weight, bias, mean, invstd), strict=True):
            torch.testing.assert_close(got, want, **tol)
        ref(x.flatten(0, 1))
        torch.testing.assert_close(bn.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(bn.running_var, ref.running_var, **tol)
        before = bn.running_mean.clone()
        assert torch.equal(_cpu_kernels.batch_stats(x, bn)[3], scale) and torch.equal(bn.running_mean, before)
        s_k = _cpu_kernels.bn_neuron_forward(x, scale, shift, spec, k)
        with _cpu_kernels.disabled():
            s_t = bn_module.forward_torch(x, scale, shift, spec, k)
        assert 0.05 < s_t.mean() < 0.95  # both branches exercised
        assert torch.equal(s_k, s_t)
        for batch_stats in (True, False):
            got = _cpu_kernels.bn_neuron_backward(grad, x, scale, shift, mean, invstd, batch_stats, spec, k)
            with _cpu_kernels.disabled():  # the torch path in float64: float32's sums differ from it by rounding
                want = bn_module.backward_torch(
                    *(v.double() for v in (grad, x, scale, shift, mean, invstd)), batch_stats, spec,
                    k.double() if k is not None else None)
            for name, a, b in zip(("g_x", "sum g_y", "sum g_y xhat", "g_k"), got, want, strict=True):
                if b is None:
                    assert a is None, name
                    continue
                assert a.dtype == scale.dtype and a.shape == b.shape, name
                err = ((a.double() - b).abs().max() / b.abs().max()).item()
                assert err <= (1e-5 if dtype == torch.float32 else 1e-12), (name, batch_stats, err)


def test_results_do_not_depend_on_the_thread_count():
    """Each neuron and each channel is computed whole by one thread, in a fixed order, and PLIF's rate gradient
    is summed from per-block (per-group, for BatchNorm + neuron) partial sums in a fixed order: 1 thread or 2,
    the same bits (a deterministic run
    stays deterministic on another core count)."""
    x = torch.randn(4, 4, 64, 28, 28) * 1.5 + 0.6
    g = torch.randn_like(x)
    bn_in = torch.randn(16, 64, 28, 28) * 2 + 0.7
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            s, v, h = _cpu_kernels.forward(x, None, NeuronSpec())
            gx, _, _ = _cpu_kernels.backward(g, None, h, NeuronSpec())
            plif, k = NeuronSpec(type="plif"), torch.tensor(0.4)
            _, _, gk = _cpu_kernels.backward(g, None, _cpu_kernels.forward(x, None, plif, k)[2], plif, k)
            bn = BatchNorm(64)
            mean, _, invstd, _, _ = _cpu_kernels.batch_stats(x, bn)  # BatchNorm + neuron as one op, PLIF's g_k too
            scale, shift = invstd * 0.9, -mean * invstd * 0.9 + 0.1
            results.append((s, v, h, gx, gk, bn(bn_in), bn.running_mean.clone(), bn.running_var.clone(), mean, invstd,
                            _cpu_kernels.bn_neuron_forward(x, scale, shift, NeuronSpec()),
                            *_cpu_kernels.bn_neuron_backward(g, x, scale, shift, mean, invstd, True, plif, k)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_network_with_and_without_the_kernels():
    """danet18 (membrane DA, channels NCHW) in float64: the kernels change outputs, gradients and running
    statistics only by rounding; under block checkpointing too (the recomputed BatchNorm updates nothing). With
    the kernels each BatchNorm that feeds a neuron runs with it as one op (``fuse_bn_neuron: auto``), without
    them as the pair on torch ops."""
    for policy in ("none", "block"):
        torch.manual_seed(0)
        model = create_model("danet18", T=3, num_classes=10, width=8, input_size=32, checkpointing=policy)
        model = model.double()
        x, y = torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([1, 7])
        start = copy.deepcopy(model.state_dict())
        results = []
        for kernels in (contextlib.nullcontext, _cpu_kernels.disabled):  # on, then off
            model.load_state_dict(start)
            model.zero_grad(set_to_none=True)
            with kernels():
                out = model(x)
                torch.nn.functional.cross_entropy(out.mean(0), y).backward()
            results.append((out.detach(), [p.grad.clone() for p in model.parameters()],
                            copy.deepcopy(model.state_dict())))
        (out_k, grads_k, state_k), (out_t, grads_t, state_t) = results
        torch.testing.assert_close(out_k, out_t, rtol=1e-10, atol=1e-12)
        for a, b in zip(grads_k, grads_t, strict=True):
            assert ((a - b).norm() / b.norm().clamp_min(1e-300)).item() <= 1e-9
        for k in state_k:
            torch.testing.assert_close(state_k[k], state_t[k], rtol=1e-10, atol=1e-12, msg=k)


def _probe(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


_STEP = ("import torch; from models import _cpu_kernels, create_model; "
         "m = create_model('sew_resnet18', T=2, num_classes=4, width=4, input_size=16); "
         "m(torch.randn(2, 3, 16, 16)).sum().backward(); "
         "print('LIB', _cpu_kernels.library() is not None, 'WHY', _cpu_kernels.why())")


def test_build_is_cached_keyed_and_safe_for_concurrent_ranks(tmp_path):
    """Two processes building into an empty cache at once both load the kernels; one file results, named by
    the hash of source, compiler, flags and torch; a later process builds nothing (the file is untouched)."""
    env = {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", _STEP], cwd=REPO, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
        assert "LIB True WHY None" in out, out + err[-2000:]
    built = list(tmp_path.glob("cpu_kernels_*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp")), list(tmp_path.iterdir())
    cxx = _cpu_kernels._compiler()
    assert built[0].name == _cpu_kernels.library_path(cxx, _cpu_kernels.build_flags()).name
    assert _cpu_kernels.library_path(cxx, _cpu_kernels.build_flags() + ["-DX"]) != built[0]
    mtime = built[0].stat().st_mtime_ns
    r = _probe(env, _STEP)
    assert r.returncode == 0 and "LIB True" in r.stdout, r.stderr[-2000:]
    assert built[0].stat().st_mtime_ns == mtime


def test_a_failing_compiler_or_the_switch_falls_back_to_torch(tmp_path):
    """A compiler that fails: one warning naming it, the torch path, the step still runs, nothing left in the
    cache. DANET_CPU_KERNELS=0: the torch path, no warning, no build."""
    r = _probe({"TORCH_EXTENSIONS_DIR": str(tmp_path / "a"), "CXX": "false"}, _STEP)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LIB False" in r.stdout and "false exited 1" in r.stdout, r.stdout
    assert r.stderr.count("the CPU kernels are unavailable") == 1, r.stderr[-3000:]
    assert not list((tmp_path / "a").glob("*")) if (tmp_path / "a").exists() else True
    r = _probe({"TORCH_EXTENSIONS_DIR": str(tmp_path / "b"), "DANET_CPU_KERNELS": "0"}, _STEP)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "LIB False WHY None" in r.stdout and "unavailable" not in r.stderr, r.stdout + r.stderr[-2000:]
    assert not (tmp_path / "b").exists()


def test_the_layer_bench_times_the_op_and_the_pair(capsys):
    """``bench models``' BatchNorm + LIF layer entry (``run_bn_neuron_bench``) times both ways in the same rounds,
    announces each round, and says whether the kernels ran."""
    from models.bench import run_bn_neuron_bench

    threads = torch.get_num_threads()
    try:
        out = run_bn_neuron_bench(shape=(2, 2, 8, 6, 6), warmup=1, repeats=3)
    finally:
        torch.set_num_threads(threads)  # the bench sets its own
    assert out["shape"] == [2, 2, 8, 6, 6] and out["cpu_kernels"] is True
    assert set(out["median_ms"]) == {"fused", "pair"} and all(v > 0 for v in out["median_ms"].values())
    assert out["speedup_fused_vs_pair"] == pytest.approx(out["median_ms"]["pair"] / out["median_ms"]["fused"])
    assert "BatchNorm + LIF layer: round 3/3" in capsys.readouterr().err
