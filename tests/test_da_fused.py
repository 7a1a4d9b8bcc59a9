"""Learnable DA's sums as kernels (``model.fuse_da``, models/_da_triton.py): the contract between
models/connections.py and the kernels, on CPU.

The Triton kernels themselves run in tools/lif_triton_check.py (on the GPU, or in Triton's interpreter where
triton is installed: test_models' interpreter test). Here a torch stand-in with the kernels' signature and index
convention takes their place, so that what connections.py hands them (which alphas, which gradients, in which
order, under every checkpointing policy, with and without autograd) is checked against the unfused network.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.dense import dense_danet, outputs_and_grads, step_batch

from models import connections, create_model
from models.connections import DenseWeights


class TorchKernels:
    """``models._da_triton``'s two entry points in torch ops; counts the calls."""

    def __init__(self) -> None:
        self.calls = {"sum": 0, "dots": 0}

    @staticmethod
    def _index(first: int, stride: int, tri: int, k: int) -> int:
        return first + k * stride + tri * (k * (k - 1) // 2)

    def weighted_sum(self, base, ts, alpha, first, stride, tri):
        self.calls["sum"] += 1
        out = base.clone()
        for k, t in enumerate(ts):
            out += alpha[self._index(first, stride, tri, k)] * t
        return out

    def weighted_sum_dots(self, y, gs, alpha, first, stride, tri):
        self.calls["dots"] += 1
        out = torch.zeros_like(y)
        for k, g in enumerate(gs):
            out += alpha[self._index(first, stride, tri, k)] * g
        return out, torch.stack([(g * y).sum() for g in gs]).float()


@pytest.fixture
def kernels(monkeypatch):
    stand_in = TorchKernels()
    monkeypatch.setattr(connections, "_on_device", lambda t: True)
    monkeypatch.setattr(connections, "_kernels", lambda: stand_in)
    monkeypatch.setitem(connections._KERNEL_STATE, "ok", True)
    return stand_in


@pytest.mark.parametrize("policy", ["none", "block", "time", "block_time"])
def test_fused_sums_give_the_unfused_network(policy, kernels):
    """danet50 (stages of 3, 4, 6, 3 blocks) with fuse_da on equals it off: outputs, every gradient, the alphas'
    included; each aggregation went through the kernels' entry points (forward and backward)."""
    net = dense_danet(policy, width=4)
    x, y = step_batch()
    fused = copy.deepcopy(net)
    fused.fuse_da = True
    out_ref, g_ref = outputs_and_grads(net, x, y)
    assert kernels.calls == {"sum": 0, "dots": 0}
    connections.COUNTS.clear()
    out, g = outputs_and_grads(fused, x, y)
    blocks = sum(len(s.branches) for s in net.stages)
    assert connections.COUNTS.get("backward kernels") == blocks and "backward torch" not in connections.COUNTS
    assert kernels.calls["dots"] == blocks  # one backward per aggregation input y_j
    assert kernels.calls["sum"] >= blocks  # (block policies aggregate again in the recompute)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        scale = g_ref[name].abs().max().clamp_min(1e-12)
        assert (g[name] - g_ref[name]).abs().max() / scale < 5e-5, (policy, name)  # fp32 summation order only


def test_evaluation_uses_the_forward_kernel(kernels):
    """Without autograd (evaluation, a checkpoint's first forward) the sums take the forward kernel alone."""
    net = create_model("danet50", T=2, input_size=32, num_classes=10, width=4, fuse_da=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = net(x)
    assert kernels.calls == {"sum": sum(len(s.branches) for s in net.stages), "dots": 0}
    net.fuse_da = False
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-6)


def test_other_inputs_take_the_torch_ops(kernels):
    """Mixed dtypes or layouts are summed by torch ops, whatever the flag says."""
    w = DenseWeights(2)
    w.fused = True
    base, y = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        w.aggregate(base, [y, y.double()])
        w.aggregate(base, [y, y.contiguous(memory_format=torch.channels_last)])
        assert kernels.calls["sum"] == 0
        w.aggregate(base, [y, 2 * y])
    assert kernels.calls["sum"] == 1


def test_the_option_is_validated_and_reaches_the_weights():
    model = create_model("danet18", T=2, num_classes=4, width=4, input_size=16, fuse_da=True)
    assert model.fuse_da and all(s.weights.fused for s in model.stages)
    model.fuse_da = False
    assert not any(s.weights.fused for s in model.stages)
    with pytest.raises(ValueError, match="fuse_da=1: expected true or false"):
        create_model("danet18", fuse_da=1)


def test_a_failing_kernel_warns_once_and_falls_back(kernels, monkeypatch):
    """A kernel that raises (an incompatible Triton on the GPU) costs a warning, not the run: the torch ops take
    over, with the same result, and the kernels stay off for the process."""

    def broken(*args):
        raise RuntimeError("no such PTX")

    monkeypatch.setattr(kernels, "weighted_sum", broken)
    monkeypatch.setitem(connections._KERNEL_STATE, "failed", None)
    w = DenseWeights(3)
    w.fused = True
    base, ys = torch.randn(2, 3, 4, 4), [torch.randn(2, 3, 4, 4) for _ in range(3)]
    with torch.no_grad(), pytest.warns(UserWarning, match="Triton DA forward kernel failed"):
        got = w.aggregate(base, ys)
    w.fused = False
    with torch.no_grad():
        torch.testing.assert_close(got, w.aggregate(base, ys))
    assert connections._KERNEL_STATE["ok"] is False and "no such PTX" in connections._KERNEL_STATE["failed"]
    assert not connections._kernels_apply(base, *ys)


def test_a_gradient_in_another_layout_is_laid_out_once_for_the_kernels(kernels):
    """A stream gradient arriving NCHW for a channels_last stream is copied once into the stream's layout, so the
    backward kernels still take it (rather than torch ops for every alpha it meets)."""
    w = DenseWeights(2)
    w.fused = True
    cl = torch.channels_last
    base = torch.randn(2, 3, 4, 4).contiguous(memory_format=cl).requires_grad_()
    y1 = torch.randn(2, 3, 4, 4).contiguous(memory_format=cl).requires_grad_()
    y2 = torch.randn(2, 3, 4, 4).contiguous(memory_format=cl).requires_grad_()
    stash = connections.GradStash()
    s1 = w.aggregate(base, [y1], stash)
    s2 = w.aggregate(base, [y1, y2], stash)
    connections.COUNTS.clear()
    g1, g2 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)  # NCHW, as autograd may hand them over
    torch.autograd.backward([s1, s2], [g1, g2])
    assert connections.COUNTS == {"backward kernels": 2}
    a = w.alpha.detach()  # rows: s1 = base + a0 y1; s2 = base + a1 y1 + a2 y2
    torch.testing.assert_close(y1.grad, a[0] * g1 + a[1] * g2)
    torch.testing.assert_close(y2.grad, a[2] * g2)
    torch.testing.assert_close(w.alpha.grad, torch.stack([(g1 * y1).sum(), (g2 * y1).sum(), (g2 * y2).sum()]))
