"""Triton kernels for the fused multi-step LIF / IF on CUDA (imported only when triton is importable).

One program handles BLOCK neurons over all T steps, keeping the membrane in registers: forward reads x once and
writes spikes and the charged potential h once; backward reads g_s and h once and writes g_x once. Equations as
in ``models.neurons`` / ``models.lif_fused``; arithmetic in fp32 whatever the storage dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .neurons import NeuronSpec

BLOCK = 1024
_CHARGE = {"lif_decay": 0, "lif": 1, "if": 2}
_SURROGATE = {"atan": 0, "sigmoid": 1, "rect": 2}


@triton.jit
def _lif_fwd(
    x_ptr, v0_ptr, s_ptr, h_ptr, vt_ptr, M, k, vr, thr,
    T: tl.constexpr, HAS_V0: tl.constexpr, CHARGE: tl.constexpr, HARD: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    if HAS_V0:
        v = tl.load(v0_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.zeros([BLOCK], dtype=tl.float32)
    for t in tl.static_range(T):
        x = tl.load(x_ptr + t * M + offs, mask=mask, other=0.0).to(tl.float32)
        if CHARGE == 0:
            h = v + (x + vr - v) * k
        elif CHARGE == 1:
            h = x + (1.0 - k) * v + vr * k
        else:
            h = v + x
        s = (h >= thr).to(tl.float32)
        if HARD:
            v = h - h * s + vr * s
        else:
            v = h - thr * s
        tl.store(s_ptr + t * M + offs, s.to(s_ptr.dtype.element_ty), mask=mask)
        tl.store(h_ptr + t * M + offs, h.to(h_ptr.dtype.element_ty), mask=mask)
    tl.store(vt_ptr + offs, v.to(vt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lif_bwd(
    gs_ptr, h_ptr, gvt_ptr, gx_ptr, gv0_ptr, M, a, b, thr, vr, alpha,
    T: tl.constexpr, HAS_GV: tl.constexpr, HARD: tl.constexpr, DETACH: tl.constexpr, SURROGATE: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    if HAS_GV:
        carry = tl.load(gvt_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        carry = tl.zeros([BLOCK], dtype=tl.float32)
    for i in tl.static_range(T):
        t = T - 1 - i
        h = tl.load(h_ptr + t * M + offs, mask=mask, other=0.0).to(tl.float32)
        gs = tl.load(gs_ptr + t * M + offs, mask=mask, other=0.0).to(tl.float32)
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
            dvdh = tl.full([BLOCK], 1.0, dtype=tl.float32)
            if not DETACH:
                dvdh = dvdh - thr * sg
        gh = gs * sg + carry * dvdh
        tl.store(gx_ptr + t * M + offs, (gh * b).to(gx_ptr.dtype.element_ty), mask=mask)
        carry = gh * a
    tl.store(gv0_ptr + offs, carry.to(gv0_ptr.dtype.element_ty), mask=mask)


def _charge(spec: NeuronSpec) -> int:
    if spec.type == "if":
        return _CHARGE["if"]
    return _CHARGE["lif_decay" if spec.decay_input else "lif"]


def forward(x_seq: torch.Tensor, v0: torch.Tensor | None, spec: NeuronSpec):
    x = x_seq.contiguous()
    steps, m = x.shape[0], x[0].numel()
    s_seq, h_seq = torch.empty_like(x), torch.empty_like(x)
    v_last = torch.empty_like(x[0])
    v0c = v0.contiguous() if v0 is not None else x  # a dummy pointer when absent
    hard = spec.v_reset is not None
    _lif_fwd[(triton.cdiv(m, BLOCK),)](
        x, v0c, s_seq, h_seq, v_last, m,
        1.0 / spec.tau, spec.v_reset if hard else 0.0, spec.v_threshold,
        T=steps, HAS_V0=v0 is not None, CHARGE=_charge(spec), HARD=hard, BLOCK=BLOCK,
    )  # fmt: skip
    return s_seq, v_last, h_seq


def backward(g_s: torch.Tensor, g_v: torch.Tensor | None, h_seq: torch.Tensor, spec: NeuronSpec):
    g_s = g_s.contiguous()
    steps, m = h_seq.shape[0], h_seq[0].numel()
    g_x = torch.empty_like(h_seq)
    g_v0 = torch.empty_like(h_seq[0])
    gv = g_v.contiguous() if g_v is not None else g_s
    k = 1.0 / spec.tau
    a = 1.0 if spec.type == "if" else 1.0 - k
    b = k if (spec.type != "if" and spec.decay_input) else 1.0
    hard = spec.v_reset is not None
    _lif_bwd[(triton.cdiv(m, BLOCK),)](
        g_s, h_seq, gv, g_x, g_v0, m, a, b, spec.v_threshold, spec.v_reset if hard else 0.0,
        spec.surrogate_alpha,
        T=steps, HAS_GV=g_v is not None, HARD=hard, DETACH=spec.detach_reset,
        SURROGATE=_SURROGATE[spec.surrogate], BLOCK=BLOCK,
    )  # fmt: skip
    return g_x, g_v0
