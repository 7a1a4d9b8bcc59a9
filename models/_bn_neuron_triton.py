"""Triton kernels for BatchNorm-apply + LIF / IF / PLIF (``models.bn_neuron``), imported only when triton is importable.

Addressing: one time step of ``x`` is a dense block in some physical order (NCHW, channels_last, ...). With C at
its place in that order, the step is a ``[OUTER, C, INNER]`` array (INNER: the dims inside C, 1 for
channels_last; OUTER: those outside), and a program owns a tile of BR rows (a row is one (outer, inner) pair) by
BC channels over all T steps: each channel's scale, shift and sums are a vector along the tile, whatever the
layout. The tile shape follows the layout so that the contiguous dim is the tile's long one.

- ``_bn_lif_fwd``: y = x * scale + shift, charge, fire, reset in registers; writes the spikes only.
- ``_bn_lif_bwd``: per step from the last, recomputes the membrane from x (at most T steps of registers work, the loads
  of x hit the cache), walks the gradient back as ``_lif_triton._lif_bwd`` does, writes ``g_y`` and each tile's
  per-channel sums of ``g_y`` and ``g_y * xhat`` to its own row of a partial buffer (summed by torch afterwards:
  deterministic, no atomics), and PLIF's rate gradient to its own slot of another;
- ``_bn_lif_elemt``: ``g_x = scale * (g_y - sum_gy / M - xhat * sum_gy_xhat / M)`` (or ``scale * g_y`` with running
  statistics).

Arithmetic in fp32; y, h and g_y are rounded to the storage dtype where the unfused pair stores them, so forward
and backward see the same spikes. Per-step offsets are int32 (a step must have < 2**31 elements, checked).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._lif_triton import _SURROGATE, _charge, _dh_dk, _learned_rate, _neuron_step, _surrogate_and_reset
from .layout import empty_seq_like, physical_order, seq_operand
from .neuron_spec import NeuronSpec

NUM_WARPS = 4


@triton.jit
def _tile(R, C, INNER, BR: tl.constexpr, BC: tl.constexpr):
    """(offsets [BR, BC] inside one step, mask, channel index [BC], channel mask)."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = c < C
    outer = r // INNER
    row = outer * (C * INNER) + (r - outer * INNER)
    offs = row[:, None] + (c * INNER)[None, :]
    mask = (r < R)[:, None] & cm[None, :]
    return offs, mask, c, cm


@triton.jit
def _bn_lif_fwd(
    x_ptr, s_ptr, scale_ptr, shift_ptr, k_ptr, R, C, INNER, x_st, k, vr, thr,
    T: tl.constexpr, CHARGE: tl.constexpr, HARD: tl.constexpr, LEARN: tl.constexpr, BR: tl.constexpr,
    BC: tl.constexpr,
):  # fmt: skip
    offs, mask, c, cm = _tile(R, C, INNER, BR, BC)
    if LEARN:  # PLIF: the rate from device memory
        k = tl.load(k_ptr).to(tl.float32)
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    x_step = tl.cast(x_st, tl.int64)
    o_step = tl.cast(R, tl.int64) * C  # the spikes are a dense sequence
    v = tl.zeros([BR, BC], dtype=tl.float32)
    xp, sp = x_ptr, s_ptr
    for _t in tl.static_range(T):
        x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x * scale + shift).to(x_ptr.dtype.element_ty).to(tl.float32)
        h, s, v = _neuron_step(v, y, k, vr, thr, x_ptr.dtype.element_ty, CHARGE, HARD)
        tl.store(sp + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
        xp += x_step
        sp += o_step


@triton.jit
def _bn_lif_bwd(
    gs_ptr, x_ptr, gy_ptr, part_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, k_ptr, kpart_ptr, R, C, INNER,
    gs_st, x_st, k, a, b, vr, thr, alpha,
    T: tl.constexpr, CHARGE: tl.constexpr, HARD: tl.constexpr, DETACH: tl.constexpr, SURROGATE: tl.constexpr,
    LEARN: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    offs, mask, c, cm = _tile(R, C, INNER, BR, BC)
    if LEARN:  # PLIF: a and b from the rate in device memory; g_k summed per program
        k, a, b = _learned_rate(k_ptr, b, CHARGE == 0)
        g_k = tl.zeros([BR, BC], dtype=tl.float32)
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    invstd = tl.load(invstd_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    x_step = tl.cast(x_st, tl.int64)
    g_step = tl.cast(gs_st, tl.int64)
    o_step = tl.cast(R, tl.int64) * C  # g_y is a dense sequence
    dtype = x_ptr.dtype.element_ty
    carry = tl.zeros([BR, BC], dtype=tl.float32)
    sum_g = tl.zeros([BR, BC], dtype=tl.float32)
    sum_gx = tl.zeros([BR, BC], dtype=tl.float32)
    for i in tl.static_range(T):
        # the membrane of step t = T - 1 - i, recomputed from step 0 (x is the last step loaded)
        v = tl.zeros([BR, BC], dtype=tl.float32)
        v_prev = v  # the membrane step t charged from (PLIF's dh/dk)
        xp = x_ptr
        x = tl.zeros([BR, BC], dtype=tl.float32)
        h = tl.zeros([BR, BC], dtype=tl.float32)
        for _u in tl.static_range(T - i):
            x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
            y = (x * scale + shift).to(dtype).to(tl.float32)
            v_prev = v
            h, s, v = _neuron_step(v, y, k, vr, thr, dtype, CHARGE, HARD)
            xp += x_step
        gs = tl.load(gs_ptr + (T - 1 - i) * g_step + offs, mask=mask, other=0.0).to(tl.float32)
        sg, dvdh = _surrogate_and_reset(h, thr, vr, alpha, HARD, DETACH, SURROGATE)
        gh = gs * sg + carry * dvdh
        carry = gh * a
        if LEARN:
            g_k += tl.where(mask, gh * _dh_dk(h, v_prev, k, vr, CHARGE == 0), 0.0)
        gy = (gh * b).to(dtype)
        tl.store(gy_ptr + (T - 1 - i) * o_step + offs, gy, mask=mask)
        gyf = tl.where(mask, gy.to(tl.float32), 0.0)
        sum_g += gyf
        sum_gx += gyf * ((x - mean) * invstd)
    rows = tl.num_programs(0)
    tl.store(part_ptr + tl.program_id(0) * C + c, tl.sum(sum_g, axis=0), mask=cm)
    tl.store(part_ptr + (rows + tl.program_id(0)) * C + c, tl.sum(sum_gx, axis=0), mask=cm)
    if LEARN:
        tl.store(kpart_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(g_k, axis=1)))


@triton.jit
def _bn_lif_elemt(
    gy_ptr, x_ptr, gx_ptr, scale_ptr, mean_ptr, invstd_ptr, ca_ptr, cb_ptr, R, C, INNER, x_st,
    T: tl.constexpr, BATCH: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr,
):  # fmt: skip
    offs, mask, c, cm = _tile(R, C, INNER, BR, BC)
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    if BATCH:
        mean = tl.load(mean_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        invstd = tl.load(invstd_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        ca = tl.load(ca_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
        cb = tl.load(cb_ptr + c, mask=cm, other=0.0).to(tl.float32)[None, :]
    x_step = tl.cast(x_st, tl.int64)
    o_step = tl.cast(R, tl.int64) * C
    xp, gyp, gxp = x_ptr, gy_ptr, gx_ptr
    for _t in tl.static_range(T):
        gy = tl.load(gyp + offs, mask=mask, other=0.0).to(tl.float32)
        if BATCH:
            x = tl.load(xp + offs, mask=mask, other=0.0).to(tl.float32)
            gy = gy - ca - ((x - mean) * invstd) * cb
        tl.store(gxp + offs, (gy * scale).to(gx_ptr.dtype.element_ty), mask=mask)
        xp += x_step
        gyp += o_step
        gxp += o_step


def _geometry(ref: torch.Tensor) -> tuple[int, int, int, int, int]:
    """(R, C, INNER, BR, BC) for a dense step ``ref`` ``[N, C, H, W]``."""
    if ref.numel() >= 2**31:
        raise ValueError(f"one time step has {ref.numel()} elements; the Triton kernels handle < 2**31")
    order = physical_order(ref)
    inner = math.prod(ref.shape[d] for d in order[order.index(1) + 1 :])
    channels = ref.shape[1]
    br, bc = (16, 64) if inner == 1 else (256, 4)  # the contiguous dim along the tile's long side
    return ref.numel() // channels, channels, inner, br, bc


def _grid(rows: int, channels: int, br: int, bc: int) -> tuple[int, int]:
    return (triton.cdiv(rows, br), triton.cdiv(channels, bc))


def forward(
    x_seq: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, spec: NeuronSpec, k: torch.Tensor | None = None
) -> torch.Tensor:
    """Spikes, in ``x_seq``'s step layout (``k``: PLIF's rate, a 0-dim tensor on the device)."""
    s_seq = empty_seq_like(x_seq)
    rows, channels, inner, br, bc = _geometry(s_seq[0])
    x, x_st = seq_operand(x_seq, s_seq[0])
    hard = spec.v_reset is not None
    _bn_lif_fwd[_grid(rows, channels, br, bc)](
        x, s_seq, scale, shift, k if k is not None else scale, rows, channels, inner, x_st,
        spec.rate(), spec.v_reset if hard else 0.0, spec.v_threshold,
        T=x_seq.shape[0], CHARGE=_charge(spec), HARD=hard, LEARN=k is not None, BR=br, BC=bc,
        num_warps=NUM_WARPS,
    )  # fmt: skip
    return s_seq


def backward(g_s, x_seq, scale, shift, mean, invstd, batch_stats: bool, spec: NeuronSpec, k=None):
    """(g_x in ``x_seq``'s step layout, sum g_y, sum g_y * xhat, PLIF's g_k or None: one fp32 partial sum per
    program, added up by torch)."""
    steps = x_seq.shape[0]
    g_y = empty_seq_like(x_seq)
    ref = g_y[0]
    rows, channels, inner, br, bc = _geometry(ref)
    x, x_st = seq_operand(x_seq, ref)
    gs, gs_st = seq_operand(g_s, ref)
    grid = _grid(rows, channels, br, bc)
    part = torch.empty((2, grid[0], channels), dtype=torch.float32, device=x_seq.device)
    learn = k is not None
    k_part = torch.empty(grid, dtype=torch.float32, device=x_seq.device) if learn else None
    rate = spec.rate()
    a, b = spec.coefficients()  # (PLIF: the kernel reads k and sets a and b itself)
    hard = spec.v_reset is not None
    _bn_lif_bwd[grid](
        gs, x, g_y, part, scale, shift, mean, invstd, k if learn else scale, k_part if learn else part, rows,
        channels, inner, gs_st, x_st, rate, a, b, spec.v_reset if hard else 0.0, spec.v_threshold,
        spec.surrogate_alpha,
        T=steps, CHARGE=_charge(spec), HARD=hard, DETACH=spec.detach_reset, SURROGATE=_SURROGATE[spec.surrogate],
        LEARN=learn, BR=br, BC=bc, num_warps=NUM_WARPS,
    )  # fmt: skip
    sums = part.sum(1)
    sum_gy, sum_gy_xhat = sums[0].to(scale.dtype), sums[1].to(scale.dtype)
    count = steps * rows
    ca = (sum_gy / count).float().contiguous()
    cb = (sum_gy_xhat / count).float().contiguous()
    g_x = empty_seq_like(x_seq)
    _bn_lif_elemt[grid](
        g_y, x, g_x, scale, mean, invstd, ca, cb, rows, channels, inner, x_st,
        T=steps, BATCH=batch_stats, BR=br, BC=bc, num_warps=NUM_WARPS,
    )  # fmt: skip
    return g_x, sum_gy, sum_gy_xhat, (k_part.sum().to(k.dtype) if learn else None)
