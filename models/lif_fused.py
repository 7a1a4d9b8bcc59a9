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

PLIF is the LIF with a learnable rate ``k = sigmoid(w)`` in place of ``1/tau``: the same charge with ``k`` a
0-dim tensor (``plif_rate``; on CUDA the kernels read it from device memory, so nothing waits on the host), and
one more output of backward, the rate's gradient summed over every step and element:
    g_k = sum_t g_h[t] * dh[t]/dk     dh/dk = (h[t] - v[t-1]) / k      (decay_input: h = v + k (x + v_reset - v))
                                            = v_reset - v[t-1]         (otherwise:   h = x + (1 - k) v + k v_reset)
with ``v[t-1]`` the membrane after step t - 1's reset (the initial membrane, or 0, at t = 0), recomputed from the
saved ``h`` as forward computed it: still only ``h`` is saved (and the initial membrane, where one is given).

Three implementations of the same equations (LIF, IF and PLIF), chosen per call:
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


def plif_rate(w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """PLIF's rate ``k = sigmoid(w)`` (0-dim) in the dtype its charge computes in for inputs of ``dtype``: theirs
    for float32 / float64, float32 for lower precisions (as the kernels compute). The reference loop and the fused
    paths both take it from here, so their spikes agree bit for bit."""
    return torch.sigmoid(w).to(torch.promote_types(dtype, torch.float32))


def _check_rate(spec: NeuronSpec, k: torch.Tensor | None) -> None:
    if (spec.type == "plif") != (k is not None):
        raise ValueError(f"a {spec.type} neuron takes {'its rate k' if k is None else 'no rate k'}: PLIF's "
                         "learnable k = sigmoid(w) goes with type plif, and only with it")


def forward_vectorised(
    x_seq: torch.Tensor, v: torch.Tensor | None, spec: NeuronSpec, k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(spikes, final membrane, h) with torch ops, a loop over T: any device and dtype (``k``: PLIF's rate)."""
    _check_rate(spec, k)
    thr = spec.v_threshold
    vr = 0.0 if spec.v_reset is None else spec.v_reset
    learnable = k is not None
    k = spec.rate(k)
    keep = 1.0 - k if learnable else None
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
            elif learnable:  # (a tensor rate: torch.add's alpha takes a number)
                torch.mul(v, keep, out=h).add_(x)
            else:
                torch.add(x, v, alpha=1.0 - k, out=h)
            if vr != 0.0:
                h.add_(vr * k)
        # fire
        torch.ge(h, thr, out=s)
        # reset into a reused buffer (read by the next charge before being overwritten)
        _reset(h, s, spec, out=v_buf)
        v = v_buf
    return s_seq, v_buf, h_seq


def _reset(h: torch.Tensor, s: torch.Tensor, spec: NeuronSpec, out: torch.Tensor) -> torch.Tensor:
    """The membrane after the reset, into ``out``: forward's, and PLIF backward's recomputation of it."""
    if spec.v_reset is None:
        return torch.sub(h, s, alpha=spec.v_threshold, out=out)
    torch.addcmul(h, h, s, value=-1.0, out=out)
    return out.add_(s, alpha=spec.v_reset) if spec.v_reset != 0.0 else out


def rate_gradient(
    g_h: torch.Tensor, h_seq: torch.Tensor, v0: torch.Tensor | None, k: torch.Tensor, spec: NeuronSpec
) -> torch.Tensor:
    """PLIF's ``g_k = sum g_h * dh/dk`` (the module docstring) with torch ops, accumulated in at least float32."""
    acc = torch.promote_types(h_seq.dtype, torch.float32)
    v_prev = empty_seq_like(h_seq)  # v[t-1]: the membrane each step charged from
    if v0 is None:
        v_prev[0].zero_()
    else:
        v_prev[0].copy_(v0)
    if h_seq.shape[0] > 1:
        _reset(h_seq[:-1], torch.ge(h_seq[:-1], spec.v_threshold).to(h_seq.dtype), spec, out=v_prev[1:])
    if spec.decay_input:
        dh_dk = (h_seq.to(acc) - v_prev.to(acc)).div_(k)
    else:
        dh_dk = (0.0 if spec.v_reset is None else spec.v_reset) - v_prev.to(acc)
    return (g_h.to(acc) * dh_dk).sum().to(k.dtype)


def backward_vectorised(
    g_s: torch.Tensor, g_v: torch.Tensor | None, h_seq: torch.Tensor, spec: NeuronSpec,
    k: torch.Tensor | None = None, v0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(g_x, the initial membrane's gradient, PLIF's g_k or None) with torch ops; g_h[t] is built in g_x[t],
    scaled by b at the end (``k``, ``v0``: PLIF's rate and forward's initial membrane, for g_k)."""
    _check_rate(spec, k)
    thr, alpha = spec.v_threshold, spec.surrogate_alpha
    a, b = spec.coefficients(k)
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
    g_k = rate_gradient(g_x, h_seq, v0, k, spec) if k is not None else None
    g_v0 = g_x[0] * a
    if isinstance(b, torch.Tensor) or b != 1.0:
        g_x.mul_(b)
    return g_x, g_v0, g_k


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
    schema=f"(Tensor x_seq, Tensor? v0, Tensor? k, {_SPEC_ARGS}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _lif_forward(x_seq, v0, k, *fields):
    """(spikes, final membrane, charged potential h): h is what backward needs."""
    return _forward(x_seq, v0, _spec(*fields), k)


def _forward(x_seq, v0, spec: NeuronSpec, k=None):
    if x_seq.is_cuda and _triton_ok():
        return _forward_triton(x_seq, v0, spec, k)
    if _cpu_kernels.applies(x_seq):
        return _cpu_kernels.forward(x_seq, v0, spec, k)
    return forward_vectorised(x_seq, v0, spec, k)


@_lif_forward.register_fake
def _(x_seq, v0, k, *fields):
    return empty_seq_like(x_seq), empty_step_like(x_seq), empty_seq_like(x_seq)


@torch.library.custom_op(
    "danet::lif_backward", mutates_args=(),
    schema=f"(Tensor g_s, Tensor? g_v, Tensor h_seq, Tensor? k, Tensor? v0, {_SPEC_ARGS}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip
def _lif_backward(g_s, g_v, h_seq, k, v0, *fields):
    """(gradient of x_seq, gradient of the initial membrane, gradient of PLIF's k: 0-dim, zero without one)."""
    g_x, g_v0, g_k = _backward(g_s, g_v, h_seq, _spec(*fields), k, v0)
    return g_x, g_v0, g_k if g_k is not None else h_seq.new_zeros(())


def _backward(g_s, g_v, h_seq, spec: NeuronSpec, k=None, v0=None):
    if h_seq.is_cuda and _triton_ok():
        return _backward_triton(g_s, g_v, h_seq, spec, k, v0)
    if _cpu_kernels.applies(h_seq):
        return _cpu_kernels.backward(g_s, g_v, h_seq, spec, k, v0)
    return backward_vectorised(g_s, g_v, h_seq, spec, k, v0)


@_lif_backward.register_fake
def _(g_s, g_v, h_seq, k, v0, *fields):
    return empty_seq_like(h_seq), empty_step_like(h_seq), h_seq.new_empty(() if k is None else k.shape,
                                                                        dtype=h_seq.dtype if k is None else k.dtype)


def _setup_context(ctx, inputs, output) -> None:
    _, v0, k, *fields = inputs
    # the initial membrane is needed again only for PLIF's g_k (its first step charged from it)
    ctx.save_for_backward(output[2], k, v0 if k is not None else None)
    ctx.mark_non_differentiable(output[2])
    ctx.fields, ctx.has_v0 = tuple(fields), v0 is not None


def _op_backward(ctx, g_s, g_v, _g_h):
    h_seq, k, v0 = ctx.saved_tensors
    if g_s is None:  # only the final membrane was used
        g_s = torch.zeros_like(h_seq)
    g_x, g_v0, g_k = torch.ops.danet.lif_backward(g_s, g_v, h_seq, k, v0, *ctx.fields)
    return (g_x, g_v0 if ctx.has_v0 else None, g_k if k is not None else None) + (None,) * len(ctx.fields)


_lif_forward.register_autograd(_op_backward, setup_context=_setup_context)


class _FusedLIF(torch.autograd.Function):
    """The same forward and backward for eager mode: a plain autograd Function costs less host time per call
    than the registered op's dispatch (~60 us less per layer on CPU), which adds up over a deep network."""

    @staticmethod
    def forward(ctx, x_seq, v0, k, spec):  # type: ignore[override]
        s_seq, v_last, h_seq = _forward(x_seq, v0, spec, k)
        ctx.save_for_backward(h_seq, k, v0 if k is not None else None)
        ctx.spec, ctx.has_v0 = spec, v0 is not None
        ctx.set_materialize_grads(False)  # the final membrane is rarely used: no zeros tensor for its gradient
        return s_seq, v_last

    @staticmethod
    def backward(ctx, g_s, g_v):  # type: ignore[override]
        h_seq, k, v0 = ctx.saved_tensors
        if g_s is None:  # only the final membrane was used
            g_s = torch.zeros_like(h_seq)
        g_x, g_v0, g_k = _backward(g_s, g_v, h_seq, ctx.spec, k, v0)
        return g_x, (g_v0 if ctx.has_v0 else None), g_k, None


def fused_lif(
    x_seq: torch.Tensor, v: torch.Tensor | None, spec: NeuronSpec, k: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spikes ``[T, N, ...]`` and final membrane for an LIF, IF or PLIF neuron; PLIF passes its rate ``k``
    (``plif_rate``), and gets its gradient."""
    _check_rate(spec, k)
    if torch.compiler.is_compiling():  # one opaque node in the graph, no break
        spikes, v_last, _ = torch.ops.danet.lif_forward(x_seq, v, k, *_spec_fields(spec))
        return spikes, v_last
    return _FusedLIF.apply(x_seq, v, k, spec)


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


def _forward_triton(x_seq, v0, spec, k):
    from . import _lif_triton

    try:
        return _lif_triton.forward(x_seq, v0, spec, k)
    except Exception as exc:
        _TRITON_STATE["ok"] = False
        warnings.warn(f"Triton LIF kernel failed ({exc!r}); using the vectorised path", stacklevel=2)
        return forward_vectorised(x_seq, v0, spec, k)


def _backward_triton(g_s, g_v, h_seq, spec, k, v0):
    from . import _lif_triton

    try:
        return _lif_triton.backward(g_s, g_v, h_seq, spec, k, v0)
    except Exception as exc:
        _TRITON_STATE["ok"] = False
        warnings.warn(f"Triton LIF backward failed ({exc!r}); using the vectorised path", stacklevel=2)
        return backward_vectorised(g_s, g_v, h_seq, spec, k, v0)
