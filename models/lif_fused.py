"""Fused multi-step LIF / IF: forward and backward over all T in one autograd op.

Same equations and the same floating-point operations as ``models.neurons.MultiStepNeuron`` (see there), so
spikes agree bit for bit with the reference loop and gradients to rounding. What it saves for backward is only
the charged potential ``h`` (``[T, N, ...]``, the input dtype): the spike is ``h >= v_threshold`` and the surrogate
``sg(h - v_threshold)``, both recomputed in backward, which is cheaper than storing them and far cheaper than
autograd's graph of every intermediate of the reference loop.

Backward, per step t from T-1 down to 0, with ``g_v`` the gradient reaching the membrane after step t:
    g_h[t] = g_s[t] * sg(h[t] - thr) + g_v * dv/dh     dv/dh = 1 - s (hard reset, detached)
                                                              = 1 - s + (v_reset - h) sg (hard, not detached)
                                                              = 1 (soft, detached) or 1 - thr sg (soft)
    g_x[t] = g_h[t] * b        (b = 1/tau for LIF with decay_input, else 1)
    g_v    = g_h[t] * a        (a = 1 - 1/tau for LIF, 1 for IF)

Three implementations of the same equations, chosen per call:
- CUDA with Triton importable: one kernel over all T per direction (``_lif_triton``);
- CPU, float32 / float64: one C++ pass over all T per direction (``_cpu_kernels``, built on first use with the
  system compiler);
- anywhere else, and wherever those cannot be built: the vectorised torch loop over T below, writing into
  preallocated buffers (three passes over the data per step forward, six backward for the default neuron).
A kernel that fails to build falls back to the vectorised path, with a warning.

The op is registered with ``torch.library`` (``danet::lif_forward`` / ``danet::lif_backward``, each with a fake
kernel for tracing and the pair wired as forward and backward), so ``torch.compile(fullgraph=True)`` sees one
opaque node per neuron instead of breaking the graph; eager mode calls the same kernels through an autograd
Function (cheaper to dispatch). Layout: outputs take the input's physical layout
(``models.layout``): channels_last steps stay channels_last, a broadcast-over-T input needs no copy.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch

from . import _cpu_kernels
from .layout import empty_seq_like, empty_step_like
from .neuron_spec import NeuronSpec


def _surrogate_(d: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """In place: d = h - thr becomes sg(d). Must match ``neurons.surrogate_grad``."""
    if kind == "atan":
        return d.square_().mul_((math.pi / 2 * alpha) ** 2).add_(1.0).reciprocal_().mul_(alpha / 2)
    if kind == "sigmoid":
        s = torch.sigmoid(d.mul_(alpha))
        return torch.mul(s, 1.0 - s, out=d).mul_(alpha)
    if kind == "rect":
        return d.abs_().lt_(0.5 / alpha).mul_(alpha)
    raise ValueError(f"unknown surrogate {kind!r}")


def _coefficients(spec: NeuronSpec) -> tuple[float, float]:
    """(a, b): h = a * v + b * x (+ constant), for the backward pass."""
    if spec.type == "if":
        return 1.0, 1.0
    k = 1.0 / spec.tau
    return 1.0 - k, (k if spec.decay_input else 1.0)


def forward_vectorised(
    x_seq: torch.Tensor, v: torch.Tensor | None, spec: NeuronSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spikes, final membrane, h) with torch ops, a loop over T: any device and dtype."""
    thr = spec.v_threshold
    vr = 0.0 if spec.v_reset is None else spec.v_reset
    k = 1.0 / spec.tau
    h_seq = empty_seq_like(x_seq)
    s_seq = empty_seq_like(x_seq)
    v_buf = empty_step_like(x_seq)
    for t in range(x_seq.shape[0]):
        x, h, s = x_seq[t], h_seq[t], s_seq[t]
        # charge (the same ops as MultiStepNeuron.charge)
        if spec.type == "if":
            if v is None:
                h.copy_(x)
            else:
                torch.add(x, v, out=h)
        elif spec.decay_input:
            target = x + vr if vr != 0.0 else x
            if v is None:
                torch.mul(target, k, out=h)
            else:
                torch.lerp(v, target, k, out=h)
        else:
            if v is None:
                h.copy_(x)
            else:
                torch.add(x, v, alpha=1.0 - k, out=h)
            if vr != 0.0:
                h.add_(vr * k)
        # fire
        torch.ge(h, thr, out=s)
        # reset into a reused buffer (read by the next charge before being overwritten)
        if spec.v_reset is None:
            torch.sub(h, s, alpha=thr, out=v_buf)
        else:
            torch.addcmul(h, h, s, value=-1.0, out=v_buf)
            if vr != 0.0:
                v_buf.add_(s, alpha=vr)
        v = v_buf
    return s_seq, v_buf, h_seq


def backward_vectorised(
    g_s: torch.Tensor, g_v: torch.Tensor | None, h_seq: torch.Tensor, spec: NeuronSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """g_x and the gradient of the initial membrane with torch ops; g_h[t] is built in g_x[t], scaled by b at the
    end."""
    thr, alpha = spec.v_threshold, spec.surrogate_alpha
    a, b = _coefficients(spec)
    steps = h_seq.shape[0]
    g_x = empty_seq_like(h_seq)
    d = empty_step_like(h_seq)
    keep = empty_step_like(h_seq)
    one = torch.ones((), dtype=h_seq.dtype, device=h_seq.device)
    for t in range(steps - 1, -1, -1):
        h, g = h_seq[t], g_x[t]
        # g <- the gradient reaching the membrane after step t (from step t + 1's charge, or from the output)
        if t < steps - 1:
            torch.mul(g_x[t + 1], a, out=g)
        elif g_v is None:
            g.zero_()
        else:
            g.copy_(g_v)
        if spec.surrogate == "atan" and spec.detach_reset:
            # the default neuron: g = g * dv/dh + g_s * (alpha / 2) / (1 + c d^2), six cheap passes
            # (a float 0/1 multiply is several times faster than masked_fill_ on CPU)
            if spec.v_reset is not None and (t < steps - 1 or g_v is not None):
                g.mul_(torch.lt(h, thr, out=d))  # hard reset: dv/dh = 1 - s
            torch.sub(h, thr, out=d)
            torch.addcmul(one, d, d, value=(math.pi / 2 * alpha) ** 2, out=d)
            g.addcdiv_(g_s[t], d, value=alpha / 2)
            continue
        torch.sub(h, thr, out=d)
        sg = _surrogate_(d, spec.surrogate, alpha)
        if spec.v_reset is None:
            if not spec.detach_reset:
                g.addcmul_(g, sg, value=-thr)
        else:
            extra = None if spec.detach_reset else torch.sub(spec.v_reset, h).mul_(sg).mul_(g)
            g.mul_(torch.lt(h, thr, out=keep))  # g * (1 - s) [+ g * (v_reset - h) * sg]
            if extra is not None:
                g.add_(extra)
        g.addcmul_(g_s[t], sg)
    g_v0 = g_x[0] * a
    if b != 1.0:
        g_x.mul_(b)
    return g_x, g_v0


# --------------------------------------------------------------------------------------------- the registered op

# The spec travels through the op as its fields (an op takes only tensors and scalars).
_SPEC_ARGS = ("str kind, float tau, float v_threshold, float? v_reset, bool decay_input, bool detach_reset, "
              "str surrogate, float surrogate_alpha")


def _spec_fields(spec: NeuronSpec) -> tuple:
    return (spec.type, spec.tau, spec.v_threshold, spec.v_reset, spec.decay_input, spec.detach_reset,
            spec.surrogate, spec.surrogate_alpha)


@functools.lru_cache(maxsize=64)
def _spec(*fields) -> NeuronSpec:
    kind, tau, thr, vr, decay, detach, surrogate, alpha = fields
    return NeuronSpec(type=kind, tau=tau, v_threshold=thr, v_reset=vr, decay_input=decay, detach_reset=detach,
                      surrogate=surrogate, surrogate_alpha=alpha)


@torch.library.custom_op(
    "danet::lif_forward", mutates_args=(),
    schema=f"(Tensor x_seq, Tensor? v0, {_SPEC_ARGS}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _lif_forward(x_seq, v0, *fields):
    """(spikes, final membrane, charged potential h): h is what backward needs."""
    return _forward(x_seq, v0, _spec(*fields))


def _forward(x_seq, v0, spec: NeuronSpec):
    if x_seq.is_cuda and _triton_ok():
        return _forward_triton(x_seq, v0, spec)
    if _cpu_kernels.applies(x_seq):
        return _cpu_kernels.forward(x_seq, v0, spec)
    return forward_vectorised(x_seq, v0, spec)


@_lif_forward.register_fake
def _(x_seq, v0, *fields):
    return empty_seq_like(x_seq), empty_step_like(x_seq), empty_seq_like(x_seq)


@torch.library.custom_op(
    "danet::lif_backward", mutates_args=(),
    schema=f"(Tensor g_s, Tensor? g_v, Tensor h_seq, {_SPEC_ARGS}) -> (Tensor, Tensor)",
)  # fmt: skip
def _lif_backward(g_s, g_v, h_seq, *fields):
    """(gradient of x_seq, gradient of the initial membrane)."""
    return _backward(g_s, g_v, h_seq, _spec(*fields))


def _backward(g_s, g_v, h_seq, spec: NeuronSpec):
    if h_seq.is_cuda and _triton_ok():
        return _backward_triton(g_s, g_v, h_seq, spec)
    if _cpu_kernels.applies(h_seq):
        return _cpu_kernels.backward(g_s, g_v, h_seq, spec)
    return backward_vectorised(g_s, g_v, h_seq, spec)


@_lif_backward.register_fake
def _(g_s, g_v, h_seq, *fields):
    return empty_seq_like(h_seq), empty_step_like(h_seq)


def _setup_context(ctx, inputs, output) -> None:
    _, v0, *fields = inputs
    ctx.save_for_backward(output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.fields, ctx.has_v0 = tuple(fields), v0 is not None


def _op_backward(ctx, g_s, g_v, _g_h):
    (h_seq,) = ctx.saved_tensors
    if g_s is None:  # only the final membrane was used
        g_s = torch.zeros_like(h_seq)
    g_x, g_v0 = torch.ops.danet.lif_backward(g_s, g_v, h_seq, *ctx.fields)
    return (g_x, g_v0 if ctx.has_v0 else None) + (None,) * len(ctx.fields)


_lif_forward.register_autograd(_op_backward, setup_context=_setup_context)


class _FusedLIF(torch.autograd.Function):
    """The same forward and backward for eager mode: a plain autograd Function costs less host time per call
    than the registered op's dispatch (~60 us less per layer on CPU), which adds up over a deep network."""

    @staticmethod
    def forward(ctx, x_seq, v0, spec):  # type: ignore[override]
        s_seq, v_last, h_seq = _forward(x_seq, v0, spec)
        ctx.save_for_backward(h_seq)
        ctx.spec, ctx.has_v0 = spec, v0 is not None
        ctx.set_materialize_grads(False)  # the final membrane is rarely used: no zeros tensor for its gradient
        return s_seq, v_last

    @staticmethod
    def backward(ctx, g_s, g_v):  # type: ignore[override]
        (h_seq,) = ctx.saved_tensors
        if g_s is None:  # only the final membrane was used
            g_s = torch.zeros_like(h_seq)
        g_x, g_v0 = _backward(g_s, g_v, h_seq, ctx.spec)
        return g_x, (g_v0 if ctx.has_v0 else None), None


def fused_lif(
    x_seq: torch.Tensor, v: torch.Tensor | None, spec: NeuronSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[T, N, ...]`` and final membrane for an LIF or IF neuron (``spec.type`` in lif, if)."""
    if spec.type not in ("lif", "if"):
        raise ValueError(f"fused_lif supports lif and if neurons, not {spec.type!r}")
    if torch.compiler.is_compiling():  # one opaque node in the graph, no break
        spikes, v_last, _ = torch.ops.danet.lif_forward(x_seq, v, *_spec_fields(spec))
        return spikes, v_last
    return _FusedLIF.apply(x_seq, v, spec)


# --------------------------------------------------------------------------------------------- Triton (CUDA)

_TRITON_STATE: dict[str, object] = {}


def _triton_ok() -> bool:
    """Whether the Triton kernels can be used (imported and built once; False after any failure)."""
    if "ok" not in _TRITON_STATE:
        try:
            from . import _lif_triton  # noqa: F401

            _TRITON_STATE["ok"] = True
        except Exception as exc:  # no triton, or an incompatible one: the vectorised path is exact too
            _TRITON_STATE["ok"] = False
            _TRITON_STATE["why"] = repr(exc)
    return bool(_TRITON_STATE["ok"])


def _forward_triton(x_seq, v0, spec):
    from . import _lif_triton

    try:
        return _lif_triton.forward(x_seq, v0, spec)
    except Exception as exc:
        _TRITON_STATE["ok"] = False
        warnings.warn(f"Triton LIF kernel failed ({exc!r}); using the vectorised path", stacklevel=2)
        return forward_vectorised(x_seq, v0, spec)


def _backward_triton(g_s, g_v, h_seq, spec):
    from . import _lif_triton

    try:
        return _lif_triton.backward(g_s, g_v, h_seq, spec)
    except Exception as exc:
        _TRITON_STATE["ok"] = False
        warnings.warn(f"Triton LIF backward failed ({exc!r}); using the vectorised path", stacklevel=2)
        return backward_vectorised(g_s, g_v, h_seq, spec)
