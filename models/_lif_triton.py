"""Triton kernels for the fused multi-step LIF / IF / PLIF on CUDA (imported only when triton is importable).

One program handles BLOCK neurons over all T steps, keeping the membrane in registers: forward reads x once and
writes spikes and the charged potential h once; backward reads g_s and h once and writes g_x once. Equations as
in ``models.neurons`` / ``models.lif_fused``; arithmetic in fp32 whatever the storage dtype. The spike and the
reset are computed from h as stored (rounded to the storage dtype), so backward, which reloads the stored h,
sees the same spikes forward emitted.

Layout: the kernels address every operand as ``base + t * t_stride + i`` for ``i`` in ``[0, M)``, M the elements
of one step: each step must be one dense block, the same physical order in every operand. The wrappers below
guarantee that without converting what already fits: outputs are allocated in the input's own step order
(``models.layout``: channels_last stays channels_last), an input in that order is passed as it is with its own
time stride (0 for a sequence broadcast over T: no copy), and only an operand in another order is copied into
it. Per-step offsets are int32 (a step must have < 2**31 elements, checked); time offsets are advanced as
64-bit pointers, so T * M may exceed that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import dense_seq, empty_seq_like, empty_step_like, seq_operand, step_operand
from .neuron_spec import NeuronSpec

BLOCK = 1024
NUM_WARPS = 4  # BLOCK / (32 * NUM_WARPS) = 8 elements per thread, in both directions
_CHARGE = {"lif_decay": 0, "lif": 1, "if": 2}
_SURROGATE = {"atan": 0, "sigmoid": 1, "rect": 2}


@triton.jit
def _reset(h, s, vr, thr, HARD: tl.constexpr):
    """The membrane after the reset, from the stored h and its spike s: forward's, and PLIF backward's
    recomputation of it."""
    if HARD:
        return h - h * s + vr * s
    return h - thr * s


@triton.jit
def _learned_rate(k_ptr, b, DECAY: tl.constexpr):
    """PLIF: the rate k from device memory and backward's coefficients from it: (k, a = 1 - k, b = k with
    decay_input, else the b given)."""
    k = tl.load(k_ptr).to(tl.float32)
    if DECAY:
        b = k
    return k, 1.0 - k, b


@triton.jit
def _dh_dk(h, v_prev, k, vr, DECAY: tl.constexpr):
    """PLIF: how the charged potential h moves with the rate k, from the membrane v_prev it charged from."""
    if DECAY:
        return (h - v_prev) / k
    return vr - v_prev


@triton.jit
def _neuron_step(v, y, k, vr, thr, dtype: tl.constexpr, CHARGE: tl.constexpr, HARD: tl.constexpr):
    """One step from membrane v and input y: (h as stored, spike, next membrane)."""
    if CHARGE == 0:
        h = v + (y + vr - v) * k
    elif CHARGE == 1:
        h = y + (1.0 - k) * v + vr * k
    else:
        h = v + y
    h = h.to(dtype).to(tl.float32)
    s = (h >= thr).to(tl.float32)
    return h, s, _reset(h, s, vr, thr, HARD)


@triton.jit
def _lif_fwd(
    x_ptr, v0_ptr, s_ptr, h_ptr, vt_ptr, k_ptr, M, x_st, k, vr, thr,
    T: tl.constexpr, HAS_V0: tl.constexpr, CHARGE: tl.constexpr, HARD: tl.constexpr, LEARN: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    if LEARN:  # PLIF: the rate from device memory (no host round trip for sigmoid(w))
        k = tl.load(k_ptr).to(tl.float32)
    x_step = tl.cast(x_st, tl.int64)  # tl.cast: a scalar Triton specialised to a constant works too
    o_step = tl.cast(M, tl.int64)  # outputs are dense sequences: time stride M
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK], dtype=tl.float32)
    xp, sp, hp = x_ptr, s_ptr, h_ptr
    for _t in tl.static_range(T):
        x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
        h, s, v = _neuron_step(v, x, k, vr, thr, h_ptr.dtype.element_ty, CHARGE, HARD)
        tl.store(sp + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(hp + offs, h.to(h_ptr.dtype.element_ty), mask=mask)  # h is already rounded to this dtype
        xp += x_step
        sp += o_step
        hp += o_step
    tl.store(vt_ptr + offs, v.to(vt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _surrogate_and_reset(h, thr, vr, alpha, HARD: tl.constexpr, DETACH: tl.constexpr, SURROGATE: tl.constexpr):
    """(sg(h - thr), dv/dh) at the stored potential h: the two factors of one backward step."""
    d = h - thr
    if SURROGATE == 0:
        z = 1.5707963267948966 * alpha * d
        sg = (alpha * 0.5) / (1.0 + z * z)
    elif SURROGATE == 1:
        sig = 1.0 / (1.0 + tl.exp(-alpha * d))
        sg = alpha * sig * (1.0 - sig)
    else:
        sg = tl.where(tl.abs(d) < 0.5 / alpha, alpha, 0.0)
    s = (h >= thr).to(tl.float32)
    if HARD:
        dvdh = 1.0 - s
        if not DETACH:
            dvdh = dvdh + (vr - h) * sg
    else:
        dvdh = tl.zeros_like(h) + 1.0
        if not DETACH:
            dvdh = dvdh - thr * sg
    return sg, dvdh


@triton.jit
def _lif_bwd(
    gs_ptr, h_ptr, gvt_ptr, gx_ptr, gv0_ptr, k_ptr, v0_ptr, gk_ptr, M, gs_st, a, b, thr, vr, alpha,
    T: tl.constexpr, HAS_GV: tl.constexpr, HARD: tl.constexpr, DETACH: tl.constexpr, SURROGATE: tl.constexpr,
    LEARN: tl.constexpr, DECAY: tl.constexpr, HAS_V0: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    g_step = tl.cast(gs_st, tl.int64)
    o_step = tl.cast(M, tl.int64)  # h and g_x are dense sequences: time stride M
    if LEARN:  # PLIF: a and b from the rate in device memory; g_k summed per program
        k, a, b = _learned_rate(k_ptr, b, DECAY)
        g_k = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GV:
        carry = tl.load(gvt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    # start at the last step and walk back
    gsp = gs_ptr + (T - 1) * g_step
    hp = h_ptr + (T - 1) * o_step
    gxp = gx_ptr + (T - 1) * o_step
    h = tl.load(hp + offs, mask=mask, other=0.0).to(tl.float32)
    for _i in tl.static_range(T):
        gs = tl.load(gsp + offs, mask=mask, other=0.0).to(tl.float32)
        sg, dvdh = _surrogate_and_reset(h, thr, vr, alpha, HARD, DETACH, SURROGATE)
        gh = gs * sg + carry * dvdh
        tl.store(gxp + offs, (gh * b).to(gx_ptr.dtype.element_ty), mask=mask)
        carry = gh * a
        gsp -= g_step
        hp -= o_step
        gxp -= o_step
        if _i < T - 1:  # the previous step's h: this step's membrane came from its reset, and it is next
            h_prev = tl.load(hp + offs, mask=mask, other=0.0).to(tl.float32)
        if LEARN:
            if _i < T - 1:
                v_prev = _reset(h_prev, (h_prev >= thr).to(tl.float32), vr, thr, HARD)
            elif HAS_V0:
                v_prev = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            else:
                v_prev = tl.zeros([BLOCK], dtype=tl.float32)
            g_k += gh * _dh_dk(h, v_prev, k, vr, DECAY)
        if _i < T - 1:
            h = h_prev
    tl.store(gv0_ptr + offs, carry.to(gv0_ptr.dtype.element_ty), mask=mask)
    if LEARN:
        tl.store(gk_ptr + tl.program_id(0), tl.sum(g_k, axis=0))


def _charge(spec: NeuronSpec) -> int:
    if spec.type == "if":
        return _CHARGE["if"]
    return _CHARGE["lif_decay" if spec.decay_input else "lif"]


def _grid(m: int) -> tuple[int]:
    if m >= 2**31 - BLOCK:
        raise ValueError(f"one time step has {m} elements; the Triton LIF kernel handles < 2**31 - {BLOCK}")
    return (triton.cdiv(m, BLOCK),)


def forward(x_seq: torch.Tensor, v0: torch.Tensor | None, spec: NeuronSpec, k: torch.Tensor | None = None):
    """(spikes, final membrane, h) in ``x_seq``'s step layout (see the module docstring; ``k``: PLIF's rate, a
    0-dim tensor on the device)."""
    steps = x_seq.shape[0]
    s_seq, h_seq = empty_seq_like(x_seq), empty_seq_like(x_seq)
    v_last = empty_step_like(x_seq)
    ref = h_seq[0]
    m = ref.numel()
    x, x_st = seq_operand(x_seq, ref)
    v0c = step_operand(v0, ref) if v0 is not None else v_last  # a dummy pointer when absent (never read)
    hard = spec.v_reset is not None
    _lif_fwd[_grid(m)](
        x, v0c, s_seq, h_seq, v_last, k if k is not None else v_last, m, x_st,
        spec.rate(), spec.v_reset if hard else 0.0, spec.v_threshold,
        T=steps, HAS_V0=v0 is not None, CHARGE=_charge(spec), HARD=hard, LEARN=k is not None, BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return s_seq, v_last, h_seq


def backward(
    g_s: torch.Tensor, g_v: torch.Tensor | None, h_seq: torch.Tensor, spec: NeuronSpec,
    k: torch.Tensor | None = None, v0: torch.Tensor | None = None,
):
    """(g_x, g_v0, PLIF's g_k or None) in ``h_seq``'s layout (``h_seq``: forward's own output, a dense sequence;
    ``k``, ``v0``: PLIF's rate and forward's initial membrane). g_k: one fp32 partial sum per program, added up
    by torch (a fixed order: the same result every run)."""
    steps = h_seq.shape[0]
    h_seq = dense_seq(h_seq)  # forward's own output always is
    ref = h_seq[0]
    m = ref.numel()
    g_x = empty_seq_like(h_seq)
    g_v0 = empty_step_like(h_seq)
    gs, gs_st = seq_operand(g_s, ref)
    gv = step_operand(g_v, ref) if g_v is not None else g_v0  # dummy pointer when absent (never read)
    a, b = spec.coefficients()  # (PLIF: the kernel reads k and sets a and b itself)
    hard = spec.v_reset is not None
    learn = k is not None
    grid = _grid(m)
    v0c = step_operand(v0, ref) if learn and v0 is not None else None
    partials = torch.empty(grid[0], dtype=torch.float32, device=h_seq.device) if learn else None
    _lif_bwd[grid](
        gs, h_seq, gv, g_x, g_v0, k if learn else g_v0, v0c if v0c is not None else g_v0,
        partials if learn else g_v0, m, gs_st, a, b, spec.v_threshold, spec.v_reset if hard else 0.0,
        spec.surrogate_alpha,
        T=steps, HAS_GV=g_v is not None, HARD=hard, DETACH=spec.detach_reset,
        SURROGATE=_SURROGATE[spec.surrogate], LEARN=learn, DECAY=spec.decay_input, HAS_V0=v0c is not None,
        BLOCK=BLOCK, num_warps=NUM_WARPS,
    )  # fmt: skip
    return g_x, g_v0, (partials.sum().to(k.dtype) if learn else None)
