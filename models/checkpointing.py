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

``spike_storage`` (float | byte | bit) is accepted and stored on the model; tensors are currently kept as float.
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
