"""BatchNorm followed by an LIF / IF / PLIF neuron as one op (``model.fuse_bn_neuron``: ``auto`` by default, which
fuses where the op is measured faster than the pair: the C++ CPU kernels).

In a spiking ResNet most BatchNorms feed a neuron. Run apart, the pair writes the normalised ``y`` and the
neuron's charged potential ``h`` to memory and reads them back, and keeps ``h`` for backward. Fused:

- forward: the batch statistics (one read of ``x``), then one pass over all T steps per element that normalises,
  charges, fires and resets in registers and writes only the spikes;
- backward: one pass that recomputes ``y`` and the membrane from ``x`` (saved anyway: it is BatchNorm's input),
  walks the steps back to get ``g_y`` and reduces the two per-channel sums BatchNorm's backward needs, then one
  elementwise pass for ``g_x``.

Counting reads and writes of activation-sized tensors per site: forward 3 instead of 6 (statistics, normalise,
neuron), backward 6 instead of 8; and ``h`` is never stored (``orchestrator plan`` for danet152: 503 instead of
566 MiB of saved activations per image under ``none``).

Same equations as ``BatchNorm`` then ``MultiStepNeuron``: ``y = x * scale + shift`` with ``scale = w / sqrt(var +
eps)`` and ``shift = b - mean * scale`` (statistics in at least fp32), ``y`` and ``h`` rounded to the input's
dtype as the unfused pair stores them, and BatchNorm's own gradient
``g_x = scale * (g_y - mean(g_y) - xhat * mean(g_y * xhat))``. Running statistics are updated as
``nn.BatchNorm2d`` does (unbiased variance, ``momentum`` or the cumulative average), and not while a checkpointed
block is being recomputed. The normalisation is computed as one multiply-add rather than BatchNorm's
``(x - mean) * invstd * w + b``, so values agree to rounding, and a value within rounding of the threshold may
fire on one path and not the other.

Three implementations: Triton kernels on CUDA (``_bn_neuron_triton``), C++ kernels on CPU for contiguous float32
/ float64 sequences (``_cpu_kernels``: the statistics, then one pass that writes only the spikes; backward by
groups of channels, the membrane recomputed per block of a group's span and g_x finished while the group is in
cache; 1.2-1.4x the pair on one layer, a few percent of a whole sew_resnet50 training step, BENCHMARKS.md), and
torch ops anywhere (the reference the kernels are checked against; not faster than the pair). PLIF's learnable
rate is an input like the BatchNorm's parameters, and gets its gradient (as ``lif_fused`` sums it). The reference neuron backend and
``torch.compile`` (which fuses by itself) run the unfused pair.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from . import _cpu_kernels, lif_fused
from .checkpointing import recomputing
from .layout import empty_seq_like, flat_seq
from .neuron_spec import NeuronSpec

_STATE: dict[str, object] = {}


def applies(bn: nn.BatchNorm2d, neuron: nn.Module) -> bool:
    """Whether ``bn`` then ``neuron`` can run fused (a neuron on a fused backend, not while compiling)."""
    uses_fused = getattr(neuron, "uses_fused", None)
    return bool(uses_fused and uses_fused()) and not torch.compiler.is_compiling()


# Whether ``fuse_bn_neuron: auto`` fuses on CUDA: not until the GPU check (tools/gpu_train_check.py) has measured
# the Triton kernels faster than the pair end to end. ``orchestrator plan`` sizes GPU jobs by it.
AUTO_ON_CUDA = False


def faster_here(x_seq: torch.Tensor) -> bool:
    """Whether the op is measured faster than the pair for this input (``fuse_bn_neuron: auto``): where the C++
    CPU kernels take it (BENCHMARKS.md); on CUDA as ``AUTO_ON_CUDA`` says."""
    if x_seq.is_cuda:
        return AUTO_ON_CUDA
    return _cpu_kernels.bn_neuron_applies(x_seq)


@contextlib.contextmanager
def unfused(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` runs BatchNorm and each neuron as two ops (its ``fuse_bn_neuron`` off, where it
    has one), as the pair's forward hooks and side-by-side timings need; the setting is put back after."""
    mode = getattr(model, "fuse_bn_neuron", None)
    if mode is not None:
        model.fuse_bn_neuron = False
    try:
        yield
    finally:
        if mode is not None:
            model.fuse_bn_neuron = mode


def bn_neuron(
    x_seq: torch.Tensor, bn: nn.BatchNorm2d, neuron: nn.Module, only_where_faster: bool = False
) -> torch.Tensor:
    """Spikes of ``neuron(bn(x))`` for a ``[T, N, C, H, W]`` sequence, BatchNorm over all T steps (as ``bn`` sees
    the ``[T * N, C, H, W]`` view); with ``only_where_faster`` the pair runs unless ``faster_here(x_seq)``."""
    if not applies(bn, neuron) or (only_where_faster and not faster_here(x_seq)):
        return neuron(bn(flat_seq(x_seq)).unflatten(0, x_seq.shape[:2]))
    batch_stats = bn.training or bn.running_mean is None
    mean, invstd, scale, shift = _statistics(x_seq, bn, batch_stats)
    k = lif_fused.plif_rate(neuron.w, x_seq.dtype) if neuron.spec.type == "plif" else None
    return _BNNeuron.apply(x_seq, bn.weight, bn.bias, mean, invstd, scale, shift, k, batch_stats, neuron.spec)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


@torch.no_grad()
def _statistics(
    x_seq: torch.Tensor, bn: nn.BatchNorm2d, batch_stats: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, invstd, scale, shift) per channel in the accumulation dtype (y = x * scale + shift); batch
    statistics also update ``bn``'s running ones."""
    acc = _acc_dtype(x_seq)
    if not batch_stats:
        assert bn.running_mean is not None and bn.running_var is not None
        mean, invstd = bn.running_mean.to(acc), torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        return mean, invstd, *_affine(bn.weight, bn.bias, mean, invstd)
    count = x_seq.numel() // x_seq.shape[2]
    if count < 2 and bn.training:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x_seq.shape)}")
    factor = None  # the running statistics' update, as nn.BatchNorm2d.forward does it
    if bn.training and bn.track_running_stats and bn.running_mean is not None and not recomputing():
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else float(bn.momentum)
    if _cpu_kernels.bn_neuron_applies(x_seq) and _cpu_kernels.batch_stats_apply(x_seq, bn):
        mean, _, invstd, scale, shift = _cpu_kernels.batch_stats(x_seq, bn, factor)  # all of it in one call
        return mean, invstd, scale, shift
    if x_seq.is_cuda and acc == torch.float32:
        mean, invstd = torch.batch_norm_stats(x_seq.flatten(0, 1), bn.eps)  # fp32 for bf16/fp16 input, any layout
        var = invstd.pow(-2).sub_(bn.eps)
    else:
        var, mean = torch.var_mean(x_seq.to(acc), dim=(0, 1, 3, 4), correction=0)
        invstd = torch.rsqrt(var + bn.eps)
    if factor is not None:
        bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_((var * (count / (count - 1))).to(bn.running_var.dtype), factor)
    return mean, invstd, *_affine(bn.weight, bn.bias, mean, invstd)


def _affine(weight, bias, mean, invstd) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) per channel: y = x * scale + shift."""
    scale = invstd if weight is None else weight.to(invstd.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(invstd.dtype) - mean * scale
    return scale.contiguous(), shift.contiguous()


class _BNNeuron(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x_seq, weight, bias, mean, invstd, scale, shift, k, batch_stats, spec
    ):
        # weight and bias are inputs for their gradients: scale and shift (from _statistics) carry them forward
        spikes = _forward(x_seq, scale, shift, spec, k)
        ctx.save_for_backward(x_seq, weight, mean, invstd, scale, shift, k)
        ctx.batch_stats, ctx.spec, ctx.has_bias = batch_stats, spec, bias is not None
        return spikes

    @staticmethod
    def backward(ctx, g_s):  # type: ignore[override]
        x_seq, weight, mean, invstd, scale, shift, k = ctx.saved_tensors
        g_x, sum_gy, sum_gy_xhat, g_k = _backward(g_s, x_seq, scale, shift, mean, invstd, ctx.batch_stats, ctx.spec,
                                                  k)
        g_w = sum_gy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        g_b = sum_gy.to(weight.dtype if weight is not None else x_seq.dtype) if ctx.has_bias else None
        return g_x, g_w, g_b, None, None, None, None, g_k, None, None


# --------------------------------------------------------------------------------------------- dispatch


# The backward kernel recomputes the membrane for each step from step 0: T (T + 1) / 2 unrolled steps, so long
# sequences take the torch path rather than a kernel that takes minutes to compile.
MAX_TRITON_T = 16


def _triton_ok(x: torch.Tensor) -> bool:
    if not (x.is_cuda and lif_fused._triton_ok()) or _STATE.get("failed") or x.shape[0] > MAX_TRITON_T:
        return False
    try:
        from . import _bn_neuron_triton  # noqa: F401
    except Exception as exc:  # an incompatible Triton: the torch path is exact too
        _STATE["failed"] = repr(exc)
        return False
    return True


def _fallback(what: str, exc: Exception) -> None:
    _STATE["failed"] = repr(exc)
    warnings.warn(f"Triton BatchNorm + neuron {what} failed ({exc!r}); using torch ops", stacklevel=3)


def _forward(x_seq, scale, shift, spec: NeuronSpec, k=None) -> torch.Tensor:
    if _triton_ok(x_seq):
        from . import _bn_neuron_triton

        try:
            return _bn_neuron_triton.forward(x_seq, scale, shift, spec, k)
        except Exception as exc:
            _fallback("forward", exc)
    if _cpu_kernels.bn_neuron_applies(x_seq):
        return _cpu_kernels.bn_neuron_forward(x_seq, scale, shift, spec, k)
    return forward_torch(x_seq, scale, shift, spec, k)


def _backward(g_s, x_seq, scale, shift, mean, invstd, batch_stats: bool, spec: NeuronSpec, k=None):
    if _triton_ok(x_seq):
        from . import _bn_neuron_triton

        try:
            return _bn_neuron_triton.backward(g_s, x_seq, scale, shift, mean, invstd, batch_stats, spec, k)
        except Exception as exc:
            _fallback("backward", exc)
    if _cpu_kernels.bn_neuron_applies(x_seq):
        return _cpu_kernels.bn_neuron_backward(g_s, x_seq, scale, shift, mean, invstd, batch_stats, spec, k)
    return backward_torch(g_s, x_seq, scale, shift, mean, invstd, batch_stats, spec, k)


# --------------------------------------------------------------------------------------------- torch ops


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, 1, -1, 1, 1)


def normalise(x_seq: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel, computed in the statistics' dtype, stored in x's dtype and layout."""
    y = empty_seq_like(x_seq)
    return y.copy_(torch.addcmul(_per_channel(shift), x_seq.to(scale.dtype), _per_channel(scale)))


def forward_torch(x_seq, scale, shift, spec: NeuronSpec, k=None) -> torch.Tensor:
    """Spikes with torch ops (and the neuron's own kernels): any device and dtype (``k``: PLIF's rate)."""
    return lif_fused._forward(normalise(x_seq, scale, shift), None, spec, k)[0]


def backward_torch(g_s, x_seq, scale, shift, mean, invstd, batch_stats: bool, spec: NeuronSpec, k=None):
    """(g_x, sum g_y, sum g_y * xhat, PLIF's g_k or None) with torch ops; sums per channel in the statistics'
    dtype."""
    y = normalise(x_seq, scale, shift)
    h_seq = lif_fused._forward(y, None, spec, k)[2]
    g_y, _, g_k = lif_fused._backward(g_s, None, h_seq, spec, k)
    g_y = g_y.to(scale.dtype)
    xhat = (x_seq.to(scale.dtype) - _per_channel(mean)) * _per_channel(invstd)
    dims = (0, 1, 3, 4)
    sum_gy, sum_gy_xhat = g_y.sum(dims), (g_y * xhat).sum(dims)
    if batch_stats:
        count = x_seq.numel() // x_seq.shape[2]
        g_y = g_y - _per_channel(sum_gy / count) - xhat * _per_channel(sum_gy_xhat / count)
    g_x = empty_seq_like(x_seq).copy_(g_y * _per_channel(scale))
    return g_x, sum_gy, sum_gy_xhat, g_k
