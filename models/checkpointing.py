"""Activation checkpointing for the spiking networks, and the BatchNorm that stays correct under it.

Policies (``model.checkpointing``):

* ``none``: autograd keeps every activation of all T steps.
* ``block``: each residual branch runs under ``torch.utils.checkpoint(use_reentrant=False)`` in multi-step mode:
  only the branch input is kept and the branch is recomputed in backward. Non-reentrant, so weights get gradients
  even when no input requires grad (DeepSpeed's reentrant checkpoint silently drops them).
* ``time`` and ``block_time`` currently run as ``block`` (documented fallback): BatchNorm statistics couple all T
  steps of a layer, so recomputing one time step alone needs the batch statistics saved from the first forward;
  that is not implemented yet.
* ``auto``: ``block`` when the model is in training mode (the memory model that would choose is not written yet).

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
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

POLICIES = ("none", "block", "time", "block_time", "auto")
SPIKE_STORAGE = ("float", "byte", "bit")

_state = threading.local()


def recomputing() -> bool:
    """True while a checkpointed block is being recomputed for backward."""
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
            return F.batch_norm(x, mean, var, self.weight, self.bias, True, self.momentum or 0.0, self.eps)
        return super().forward(x)


def effective_policy(policy: str) -> str:
    """The policy actually run (see the module docstring for the fallbacks)."""
    if policy not in POLICIES:
        raise ValueError(f"checkpointing={policy!r}: expected one of {', '.join(POLICIES)}")
    return "none" if policy == "none" else "block"


def run(fn: Callable[..., Any], *args: Any, policy: str = "none") -> Any:
    """Call ``fn(*args)``, checkpointed when the policy and grad mode ask for it."""
    if policy == "none" or not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=_contexts)


# --------------------------------------------------------------------------------------------- spike storage


def pack_spikes(x: torch.Tensor, storage: str) -> torch.Tensor:
    """0/1 float tensor -> uint8 (``byte``) or 8 spikes per byte (``bit``, padded to a multiple of 8)."""
    b = x.detach().reshape(-1).to(torch.uint8)
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
    """Inverse of ``pack_spikes``: a float tensor with the shape, dtype and layout of ``like`` (a meta copy)."""
    n = like.numel()
    if storage == "byte":
        flat = packed.to(like.dtype)
    else:
        bits = torch.empty(packed.numel(), 8, dtype=torch.uint8, device=packed.device)
        for i in range(8):
            torch.bitwise_and(packed >> i, 1, out=bits[:, i])
        flat = bits.view(-1)[:n].to(like.dtype)
    out = torch.empty_like(like, device=packed.device)  # keeps the layout (e.g. channels_last)
    return out.copy_(flat.view(like.shape))


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
        x = unpack_spikes(packed, storage, ctx.meta)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            grad, x, weight, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False],
        )  # fmt: skip
        return gx, gw, None, None, None


def spike_conv2d(x: torch.Tensor, conv: nn.Conv2d, storage: str) -> torch.Tensor:
    """``conv(x)`` for a 0/1 input ``x``, saving ``x`` for backward as ``storage`` (float = plain autograd)."""
    if storage == "float" or not torch.is_grad_enabled() or conv.bias is not None or conv.groups != 1:
        return conv(x)
    return _SpikeConv.apply(x, conv.weight, conv.stride, conv.padding, storage)
