"""Activation checkpointing for the spiking networks, and the BatchNorm that stays correct under it.

Policies (``model.checkpointing``):

* ``none``: autograd keeps every activation of all T steps.
* ``block``: each residual branch runs under ``torch.utils.checkpoint(use_reentrant=False)`` in multi-step mode:
  only the branch input is kept and the branch is recomputed in backward. Non-reentrant, so weights get gradients
  even when no input requires grad (DeepSpeed's reentrant checkpoint silently drops them).
* ``time``: inside every residual branch, each BatchNorm and the neuron it feeds (and a branch's leading neuron)
  run as one checkpointed segment: autograd keeps only the BatchNorm input (which the convolution's backward
  needs in any case); the normalised values, the T steps' membrane potentials and spikes are recomputed in
  backward by re-running the neuron's time loop from its initial state (the state is passed functionally, so a
  recompute starts from the same state and never advances it twice). Convolutions are not recomputed, so the
  extra work is elementwise only. With ``spike_storage`` byte/bit the spikes a convolution keeps shrink too.
  (BatchNorm normalises with statistics over all T steps, which couples the steps; the segment therefore recomputes
  all T steps of one layer at a time, which is what keeps gradients exactly those of ``none``.)
* ``block_time``: ``block`` with ``time`` inside the recompute: only the block inputs are kept across the
  network, and while one block is recomputed for its backward it keeps only its BatchNorm inputs (time segments
  nested in the block checkpoint), which lowers the transient peak of the block being differentiated.
* ``auto``: on the first training forward, the saved-activation bytes of each policy are measured on the model
  itself (``saved_activation_bytes``: batch 1, a small resolution, BatchNorm statistics restored afterwards),
  scaled to the input's batch and resolution, and the first policy in ``COST_ORDER`` (cheapest in recompute) whose
  estimate fits ``memory_budget_gb`` (0: the CUDA device's memory; on CPU no limit) is used. The choice is logged
  at INFO and kept as ``model.checkpointing_resolved``.

Correctness under recompute, by construction:

* neuron state is functional (passed in and out of a forward call, never stored in a module), so recomputing a
  block cannot advance any state a second time (SpikingJelly issue #629);
* ``BatchNorm`` below normalises with batch statistics but does not update its running statistics while a
  checkpointed block is being recomputed, so running stats after a step equal those of ``none``.

Spike storage (``model.spike_storage``): a convolution whose input is a neuron's output (binary spikes) saves that
input for its weight gradient. ``float`` keeps autograd's float tensor (4 bytes per spike); ``byte`` saves it as
uint8 and ``bit`` packs 8 spikes per byte (``spike_conv2d``); backward unpacks and calls the same convolution
backward, so gradients are identical. Inputs that are not exactly 0/1 must not be routed here (the networks only
route the outputs of neurons).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import _cpu_kernels
from .layout import flat_view, is_dense

POLICIES = ("none", "block", "time", "block_time", "auto")
# concrete policies, cheapest in recompute first (time recomputes elementwise ops only, block the convolutions)
COST_ORDER = ("none", "time", "block", "block_time")

log = logging.getLogger(__name__)
SPIKE_STORAGE = ("float", "byte", "bit")

_state = threading.local()


@runtime_checkable
class PolicySwitch(Protocol):
    """A model whose checkpointing policy can be switched (``SpikingResNet``): what the memory probe needs.

    Defined here and implemented by the networks, so this module never imports them (no import circle).
    """

    checkpointing: str
    checkpointing_resolved: str | None

    def apply_policy(self, policy: str) -> None: ...


def recomputing() -> bool:
    """True while a checkpointed block is being recomputed for backward (never inside a compiled graph)."""
    if torch.compiler.is_compiling():
        # a compiled graph recomputes at the graph level, where the running-stat updates (buffer mutations)
        # are applied once, after the graph: nothing to suppress, and no thread-local to trace
        return False
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def _recompute_context():
    previous = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = previous


def _contexts():
    return contextlib.nullcontext(), _recompute_context()


class BatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose running statistics are updated once per step even when its block is recomputed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and recomputing() and self.running_mean is not None:
            # batch statistics as in the first forward; the running-stat update goes to throwaway copies (the
            # same op with the same saved tensors, which non-reentrant checkpointing verifies)
            mean, var = self.running_mean.clone(), self.running_var.clone()
            if self._fast(x):
                return _cpu_kernels.batch_norm_train(x, self.weight, self.bias, mean, var, self.momentum or 0.0,
                                                     self.eps)
            return F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum or 0.0, self.eps)
        if self.training and self.track_running_stats and self._fast(x):
            self.num_batches_tracked.add_(1)  # what nn.BatchNorm2d.forward does before its own batch_norm
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            return _cpu_kernels.batch_norm_train(x, self.weight, self.bias, self.running_mean, self.running_var,
                                                 factor, self.eps)
        return super().forward(x)

    def _fast(self, x: torch.Tensor) -> bool:
        """Whether the C++ training forward takes x (CPU NCHW float; not while compiling: torch's op traces)."""
        return not torch.compiler.is_compiling() and _cpu_kernels.batch_norm_applies(
            x, self.weight, self.bias, self.running_mean, self.running_var)


def effective_policy(policy: str) -> str:
    """The policy run until ``auto`` is resolved (``auto`` runs as ``none`` until its first training forward)."""
    if policy not in POLICIES:
        raise ValueError(f"checkpointing={policy!r}: expected one of {', '.join(POLICIES)}")
    return "none" if policy == "auto" else policy


def _checkpointed(fn: Callable[..., Any], *args: Any) -> Any:
    if torch.compiler.is_compiling():
        # traced as a checkpoint region; a context_fn is only accepted there for selective checkpointing, and the
        # BatchNorm guard it sets up is not needed (see ``recomputing``)
        return checkpoint(fn, *args, use_reentrant=False)
    probe = getattr(_state, "probe", None)
    if probe is None:
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)
    # memory probe: a checkpoint keeps its tensor inputs (outside saved_tensors_hooks); nested ones keep nothing
    if not getattr(_state, "inside", False):
        for a in args:
            if isinstance(a, torch.Tensor):
                probe(a)

    def inner(*a: Any) -> Any:
        previous = getattr(_state, "inside", False)
        _state.inside = True
        try:
            return fn(*a)
        finally:
            _state.inside = previous

    return checkpoint(inner, *args, use_reentrant=False, context_fn=_contexts)


def run(fn: Callable[..., Any], *args: Any, policy: str = "none") -> Any:
    """Call a residual branch ``fn(*args)``, checkpointed as a whole under ``block`` / ``block_time``."""
    if policy in ("block", "block_time") and torch.is_grad_enabled():
        return _checkpointed(fn, *args)
    return fn(*args)


def run_segment(fn: Callable[..., Any], *args: Any, policy: str = "none") -> Any:
    """Call a BatchNorm + neuron segment, checkpointed under ``time`` / ``block_time``."""
    if policy in ("time", "block_time") and torch.is_grad_enabled():
        return _checkpointed(fn, *args)
    return fn(*args)


# --------------------------------------------------------------------------------------------- memory model


@contextlib.contextmanager
def preserved_buffers(model: nn.Module):
    """Restore every buffer (BatchNorm running stats, counters) of ``model`` on exit."""
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def saved_activation_bytes(
    model: nn.Module, policy: str, batch: int = 1, res: int = 64, in_channels: int = 3
) -> int:
    """Bytes autograd keeps for backward after one training forward of ``model`` under ``policy``.

    Counted with ``saved_tensors_hooks`` (distinct storages, parameters excluded), on CPU, in the model's own
    training mode; buffers are restored afterwards, so probing leaves no trace. Checkpointed segments keep only
    their inputs, so their recompute shows here as the inputs they keep.
    """
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except (RuntimeError, NotImplementedError):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    first = next(model.parameters())  # the probe image in the weights' device and dtype (a bf16 model refuses fp32)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    was_training = model.training
    switch = model if isinstance(model, PolicySwitch) else None
    previous = switch.checkpointing if switch is not None else None
    try:
        model.train()
        if switch is not None:
            switch.apply_policy(policy)
        x = torch.randn(batch, in_channels, res, res, device=first.device, dtype=first.dtype)
        _state.probe = pack
        with preserved_buffers(model), torch.enable_grad():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
            del out
    finally:
        _state.probe = None
        model.train(was_training)
        if switch is not None and previous is not None:
            switch.apply_policy(switch.checkpointing_resolved or effective_policy(previous))
    return sum(v for k, v in seen.items() if k not in params)


# What a step holds at its peak besides the saved activations (activation gradients in flight, the DA gradient
# stash, the working set of a block being recomputed, forward outputs still alive when backward starts), as a
# fraction of the saved activations of ``none`` with float spikes. Measured on an H200 (danet152, T=4, 224 px,
# bf16, peak per image from batch 16 vs 32, docs/bench/gpu_memory_h200.json): peak minus saved bytes was +112
# (none), +108 (time, bit spikes) and +87 (block) MiB per image against 602 MiB saved by none, float spikes.
BACKWARD_TRANSIENT = 0.19


def activation_bytes(
    model: nn.Module, policies: Iterable[str], batch: int = 1, res: int = 64, in_channels: int = 3
) -> dict[str, int]:
    """Activation memory of one training step under each policy: its saved bytes + the backward transient.

    The transient, the same for every policy, is ``BACKWARD_TRANSIENT`` x the saved bytes of ``none`` with float
    spike storage, measured once (the model's own storage setting is put back afterwards).
    """
    convs = [m for m in model.modules() if getattr(m, "spike_input", False)]
    storages = [m.spike_storage for m in convs]
    try:
        for m in convs:
            m.spike_storage = "float"
        reference = saved_activation_bytes(model, "none", batch, res, in_channels)
    finally:
        for m, st in zip(convs, storages, strict=True):
            m.spike_storage = st
    transient = int(BACKWARD_TRANSIENT * reference)
    return {p: saved_activation_bytes(model, p, batch, res, in_channels) + transient for p in policies}


def choose_policy(
    model: nn.Module, batch: int, res: int, budget_gb: float, in_channels: int = 3, probe_res: int = 64
) -> tuple[str, dict[str, float]]:
    """The first policy in ``COST_ORDER`` whose estimated memory (GiB) fits ``budget_gb``; and every estimate.

    Estimate: parameters x 16 bytes (weights, gradients, two optimizer states, fp32) + activation memory
    (``activation_bytes``: saved + backward transient) measured at batch 1 x ``probe_res`` and scaled by
    batch x (res / probe_res)^2. ``budget_gb <= 0``: no limit (``none``).
    """
    probe_res = min(probe_res, res)
    static = sum(p.numel() for p in model.parameters()) * 16
    acts = activation_bytes(model, COST_ORDER, 1, probe_res, in_channels)
    est = {p: (static + acts[p] * batch * (res / probe_res) ** 2) / 2**30 for p in COST_ORDER}
    if budget_gb <= 0:
        return "none", est
    for policy in COST_ORDER:
        if est[policy] <= budget_gb:
            return policy, est
    return COST_ORDER[-1], est


def resolve_auto(model: nn.Module, x: torch.Tensor) -> str:
    """Pick the ``auto`` policy for inputs like ``x`` (``[N, C, H, W]`` or ``[T, N, C, H, W]``); log it."""
    budget = float(getattr(model, "memory_budget_gb", 0.0) or 0.0)
    if budget <= 0 and x.is_cuda:
        budget = torch.cuda.get_device_properties(x.device).total_memory / 2**30
    batch, res = int(x.shape[-4]), int(x.shape[-1])
    policy, est = choose_policy(model, batch, res, budget, int(x.shape[-3]))
    log.info(
        "checkpointing=auto -> %s (budget %s GiB per device; estimates GiB at batch %d, %d px: %s)",
        policy, f"{budget:.1f}" if budget > 0 else "unlimited", batch, res,
        ", ".join(f"{k} {v:.2f}" for k, v in est.items()),
    )  # fmt: skip
    return policy


# --------------------------------------------------------------------------------------------- spike storage


def pack_spikes(x: torch.Tensor, storage: str) -> torch.Tensor:
    """0/1 float tensor -> uint8 (``byte``) or 8 spikes per byte (``bit``, padded to a multiple of 8).

    The spikes are read in ``x``'s physical order (no layout conversion for channels_last); ``x`` must be
    dense (``spike_conv2d`` sees to it), and ``unpack_spikes`` writes them back in the same order.
    """
    flat = flat_view(x.detach())
    if flat is None:
        raise ValueError("pack_spikes needs a dense tensor (non-overlapping, any dim order)")
    b = flat.to(torch.uint8)
    if storage == "byte":
        return b
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    b = b.view(-1, 8)
    packed = b[:, 0].clone()
    for i in range(1, 8):
        packed |= b[:, i] << i
    return packed


def unpack_spikes(packed: torch.Tensor, storage: str, like: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_spikes``: a float tensor with the shape, dtype and strides of ``like`` (dense; a meta
    copy of the packed tensor)."""
    n = like.numel()
    out = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device=packed.device)
    dest = flat_view(out)
    assert dest is not None, "unpack_spikes: like must be dense, as pack_spikes required"
    if storage == "byte":
        dest.copy_(packed)
        return out
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = torch.bitwise_right_shift(packed.unsqueeze(1), shifts).bitwise_and_(1)  # [bytes, 8]: bit i of each byte
    dest.copy_(bits.view(-1)[:n])
    return out


_conv_backward = torch.ops.aten.convolution_backward  # a module name, so a test can watch its dtypes


class _SpikeConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, stride, padding, storage):  # type: ignore[override]
        ctx.save_for_backward(pack_spikes(x, storage), weight)
        ctx.meta = torch.empty_like(x, device="meta")
        ctx.conf = (stride, padding, storage)
        return F.conv2d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        packed, weight = ctx.saved_tensors
        stride, padding, storage = ctx.conf
        # Under autocast the forward conv ran in grad's dtype (bf16/fp16) on cast copies of x and the fp32 weight;
        # backward runs outside autocast, so cast the same way here (0/1 spikes are exact in any float type).
        x = unpack_spikes(packed, storage, ctx.meta).to(grad.dtype)
        gx, gw, _ = _conv_backward(
            grad, x, weight.to(grad.dtype), None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )  # fmt: skip
        gx = gx.to(ctx.meta.dtype) if gx is not None else None
        gw = gw.to(weight.dtype) if gw is not None else None
        return gx, gw, None, None, None


def spike_conv2d(x: torch.Tensor, conv: nn.Conv2d, storage: str) -> torch.Tensor:
    """``conv(x)`` for a 0/1 input ``x``, saving ``x`` for backward as ``storage`` (float = plain autograd)."""
    if storage == "float" or not torch.is_grad_enabled() or conv.bias is not None or conv.groups != 1:
        return conv(x)
    if not is_dense(x):  # the networks only hand dense spikes here; anything else is packed from a copy
        x = x.contiguous()
    return _SpikeConv.apply(x, conv.weight, conv.stride, conv.padding, storage)
