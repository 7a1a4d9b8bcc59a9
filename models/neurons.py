"""Multi-step spiking neurons (LIF, PLIF, IF) with surrogate gradients.

Layout: every neuron takes a sequence ``x_seq`` of shape ``[T, N, ...]`` (time first; inside the networks the
trailing dims are ``C, H, W``) and returns spikes of the same shape. This is the one place that convention is
stated; the networks keep activations as ``[T * N, C, H, W]`` for convolutions and hand neurons a view.

Each neuron is three small steps per time step (``v`` is the membrane potential after the previous step):

    charge:  LIF, decay_input:   h = v + (x - (v - v_reset)) / tau        (written as lerp(v, x + v_reset, 1/tau))
             LIF, no decay_input: h = v - (v - v_reset) / tau + x         (written as x + (1 - 1/tau) v + v_reset/tau)
             PLIF: as LIF with 1/tau = sigmoid(w), w learnable (init w = -log(tau - 1))
             IF:                  h = v + x
    fire:    s = Heaviside(h - v_threshold)        backward: the surrogate derivative sg(h - v_threshold)
    reset:   hard (v_reset is a number): v = s ? v_reset : h;   soft (v_reset is None): v = h - s * v_threshold
             detach_reset: the reset does not propagate gradient through s.

Surrogates (x = h - v_threshold, alpha = ``surrogate_alpha``), SpikingJelly's conventions:
    atan:    sg(x) = alpha / 2 / (1 + (pi / 2 * alpha * x)^2)
    sigmoid: sg(x) = alpha * sigmoid(alpha x) * (1 - sigmoid(alpha x))
    rect:    sg(x) = alpha * [|x| < 1 / (2 alpha)]    (unit area; alpha = 1 is MS-ResNet's rectangle of width 1)

State is functional: ``forward(x_seq, v=None)`` starts from ``v`` (zeros by default) and never stores the
membrane anywhere, so a recomputed forward (activation checkpointing) cannot update state twice and nothing needs
resetting between batches. ``forward_with_state`` also returns the final membrane for callers that chain chunks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .layout import stack_like
from .lif_fused import fused_lif, plif_rate
from .neuron_spec import BACKENDS, NEURON_TYPES, SURROGATES, NeuronSpec, spec_from_any

__all__ = ["BACKENDS", "NEURON_TYPES", "SURROGATES", "MultiStepNeuron", "NeuronSpec", "heaviside", "make_neuron",
           "spec_from_any", "surrogate_grad"]

# --------------------------------------------------------------------------------------------- surrogates


def surrogate_grad(x: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """sg(x): the surrogate derivative of the Heaviside step at ``x = h - v_threshold`` (a new tensor)."""
    if kind == "atan":
        c = (math.pi / 2 * alpha) ** 2
        return x.square().mul_(c).add_(1.0).reciprocal_().mul_(alpha / 2)
    if kind == "sigmoid":
        s = torch.sigmoid(x * alpha)
        return s.mul_(1.0 - s).mul_(alpha)  # (1 - s) is evaluated before the in-place multiply
    if kind == "rect":
        return (x.abs() < 0.5 / alpha).to(x.dtype).mul_(alpha)
    raise ValueError(f"unknown surrogate {kind!r}; expected one of {', '.join(SURROGATES)}")


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.kind, ctx.alpha = kind, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * surrogate_grad(x, ctx.kind, ctx.alpha), None, None


def heaviside(x: torch.Tensor, kind: str = "atan", alpha: float = 2.0) -> torch.Tensor:
    """Spike = [x >= 0] in forward, surrogate derivative ``sg(x)`` in backward."""
    return _Heaviside.apply(x, kind, alpha)


# --------------------------------------------------------------------------------------------- neurons


class MultiStepNeuron(nn.Module):
    """One spiking neuron layer over a ``[T, N, ...]`` sequence; see the module docstring for the equations."""

    def __init__(self, spec: NeuronSpec | dict | None = None) -> None:
        super().__init__()
        self.spec = NeuronSpec.from_any(spec)
        s = self.spec
        if s.type == "plif":
            # 1/tau = sigmoid(w): w = -log(tau - 1) gives the configured initial tau.
            self.w = nn.Parameter(torch.tensor(-math.log(s.tau - 1.0)))
        else:
            self.register_parameter("w", None)

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"type={s.type}, tau={s.tau}, v_threshold={s.v_threshold}, v_reset={s.v_reset}, "
            f"surrogate={s.surrogate}({s.surrogate_alpha}), backend={s.backend}"
        )

    # --- the three steps (single time step; used by the reference path and by tests)
    def charge(self, x: torch.Tensor, v: torch.Tensor | None) -> torch.Tensor:
        s = self.spec
        vr = 0.0 if s.v_reset is None else s.v_reset
        if s.type == "if":
            return x.clone() if v is None else x + v
        if s.type == "plif":
            # the LIF's charge with a tensor rate, as models.lif_fused computes it (the same ops, so both paths
            # agree bit for bit)
            k = plif_rate(self.w, x.dtype)
            if s.decay_input:
                target = x + vr if vr != 0.0 else x
                return target * k if v is None else torch.lerp(v, target, k)
            h = x.clone() if v is None else torch.mul(v, 1.0 - k).add_(x)
            return h + vr * k if vr != 0.0 else h
        # LIF: the same floating-point ops as models.lif_fused, so both paths agree bit for bit.
        k = 1.0 / s.tau
        if s.decay_input:
            target = x + vr if vr != 0.0 else x
            return target * k if v is None else torch.lerp(v, target, k)
        h = x if v is None else torch.add(x, v, alpha=1.0 - k)
        return h + vr * k if vr != 0.0 else (h.clone() if v is None else h)

    def fire(self, h: torch.Tensor) -> torch.Tensor:
        return heaviside(h - self.spec.v_threshold, self.spec.surrogate, self.spec.surrogate_alpha)

    def reset(self, h: torch.Tensor, spike: torch.Tensor) -> torch.Tensor:
        s = self.spec
        sr = spike.detach() if s.detach_reset else spike
        if s.v_reset is None:
            return h - sr * s.v_threshold
        return h * (1.0 - sr) + sr * s.v_reset

    def step(self, x: torch.Tensor, v: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One time step: ``(spike, v_next)`` from input ``x`` and membrane ``v`` (None = initial state)."""
        h = self.charge(x, v)
        spike = self.fire(h)
        return spike, self.reset(h, spike)

    # --- multi-step
    def uses_fused(self) -> bool:
        return self.spec.backend != "reference"

    def forward_with_state(
        self, x_seq: torch.Tensor, v: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spikes ``[T, N, ...]`` and the final membrane ``[N, ...]`` (the state passed out, never stored)."""
        if self.uses_fused():
            k = plif_rate(self.w, x_seq.dtype) if self.w is not None else None
            return fused_lif(x_seq, v, self.spec, k)
        spikes = []
        for x in x_seq.unbind(0):  # unbind, not x_seq[t]: its backward keeps x_seq's layout (select's does not)
            spike, v = self.step(x, v)
            spikes.append(spike)
        assert v is not None
        return stack_like(spikes), v

    def forward(self, x_seq: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_with_state(x_seq, v)[0]


def make_neuron(spec: NeuronSpec | dict | None = None) -> MultiStepNeuron:
    """The neuron factory the networks call at every site (a fresh module each time)."""
    return MultiStepNeuron(spec)
