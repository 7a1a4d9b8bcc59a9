"""Triton kernels for the learnable DA aggregation (``models.connections``, ``model.fuse_da``), imported only when
triton is importable.

Both kernels treat every operand as one flat dense block in its physical order (all operands share one layout:
the caller checks), so NCHW and channels_last run the same code. A launch takes up to ``TERMS`` tensors; longer
sums chain launches through an accumulator (fp32 for a lower-precision stream), read back by the next launch.

- ``_weighted_sum``: ``out = acc + sum_k a_k t_k``: one read of each term and one write, where the in-place
  ``addcmul_`` chain reads and writes the accumulator once per term (3 tensor passes per term instead of ~1);
- ``_weighted_sum_dots``: the same sum over stream gradients ``g_m`` (the gradient of a branch output ``y``),
  and beside it each program's partial ``<g_m, y>`` for the alphas' gradients, written to its own row of a
  partial buffer that torch sums afterwards (deterministic, no atomics): 1 pass per term instead of 5.

The alpha of term k sits at ``first + k * stride + tri * k (k - 1) / 2`` in the stage's flat alpha vector:
``stride = 1, tri = 0`` walks a row (forward), ``stride = m0, tri = 1`` walks a column (backward, rows m0, m0+1..).
Arithmetic in fp32, one rounding to the storage dtype at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .layout import flat_view

TERMS = 16
BLOCK = 2048
BLOCK_DOTS = 1024  # the dots kernel holds y and the partial sums too: half the tile keeps its registers ~60
NUM_WARPS = 4


@triton.jit
def _alpha(a_ptr, first, stride, tri, K: tl.constexpr):
    return tl.load(a_ptr + first + K * stride + tri * (K * (K - 1) // 2)).to(tl.float32)


@triton.jit
def _add_term(acc, t_ptr, a_ptr, first, stride, tri, offs, mask, nt, K: tl.constexpr):
    if K < nt:  # a runtime branch, uniform over the launch: one compiled kernel serves every term count
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc + _alpha(a_ptr, first, stride, tri, K) * t
    return acc


@triton.jit
def _add_term_dot(acc, t_ptr, y, part_ptr, a_ptr, first, stride, tri, offs, mask, nt, K: tl.constexpr):
    if K < nt:
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc + _alpha(a_ptr, first, stride, tri, K) * t
        tl.store(part_ptr + K, tl.sum(t * y, axis=0))
    return acc


@triton.jit
def _start(acc_ptr, N, HAS_ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    if HAS_ACC:
        acc = tl.load(acc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    return offs, mask, acc


# Term counts, alpha positions and sizes vary from call to call: not specialised on, so that each kernel
# compiles once per dtype (and accumulator flag) rather than once per combination of those integers.
_RUNTIME = ["first", "stride", "tri", "nt", "N"]


@triton.jit(do_not_specialize=_RUNTIME)
def _weighted_sum(
    out_ptr, acc_ptr, a_ptr, first, stride, tri, nt, N,
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15,
    HAS_ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, acc = _start(acc_ptr, N, HAS_ACC, BLOCK)
    acc = _add_term(acc, t0, a_ptr, first, stride, tri, offs, mask, nt, 0)
    acc = _add_term(acc, t1, a_ptr, first, stride, tri, offs, mask, nt, 1)
    acc = _add_term(acc, t2, a_ptr, first, stride, tri, offs, mask, nt, 2)
    acc = _add_term(acc, t3, a_ptr, first, stride, tri, offs, mask, nt, 3)
    acc = _add_term(acc, t4, a_ptr, first, stride, tri, offs, mask, nt, 4)
    acc = _add_term(acc, t5, a_ptr, first, stride, tri, offs, mask, nt, 5)
    acc = _add_term(acc, t6, a_ptr, first, stride, tri, offs, mask, nt, 6)
    acc = _add_term(acc, t7, a_ptr, first, stride, tri, offs, mask, nt, 7)
    acc = _add_term(acc, t8, a_ptr, first, stride, tri, offs, mask, nt, 8)
    acc = _add_term(acc, t9, a_ptr, first, stride, tri, offs, mask, nt, 9)
    acc = _add_term(acc, t10, a_ptr, first, stride, tri, offs, mask, nt, 10)
    acc = _add_term(acc, t11, a_ptr, first, stride, tri, offs, mask, nt, 11)
    acc = _add_term(acc, t12, a_ptr, first, stride, tri, offs, mask, nt, 12)
    acc = _add_term(acc, t13, a_ptr, first, stride, tri, offs, mask, nt, 13)
    acc = _add_term(acc, t14, a_ptr, first, stride, tri, offs, mask, nt, 14)
    acc = _add_term(acc, t15, a_ptr, first, stride, tri, offs, mask, nt, 15)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=[*_RUNTIME, "part_stride"])
def _weighted_sum_dots(
    out_ptr, acc_ptr, y_ptr, part_ptr, part_stride, a_ptr, first, stride, tri, nt, N,
    t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15,
    HAS_ACC: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    offs, mask, acc = _start(acc_ptr, N, HAS_ACC, BLOCK)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    part = part_ptr + tl.program_id(0).to(tl.int64) * part_stride
    acc = _add_term_dot(acc, t0, y, part, a_ptr, first, stride, tri, offs, mask, nt, 0)
    acc = _add_term_dot(acc, t1, y, part, a_ptr, first, stride, tri, offs, mask, nt, 1)
    acc = _add_term_dot(acc, t2, y, part, a_ptr, first, stride, tri, offs, mask, nt, 2)
    acc = _add_term_dot(acc, t3, y, part, a_ptr, first, stride, tri, offs, mask, nt, 3)
    acc = _add_term_dot(acc, t4, y, part, a_ptr, first, stride, tri, offs, mask, nt, 4)
    acc = _add_term_dot(acc, t5, y, part, a_ptr, first, stride, tri, offs, mask, nt, 5)
    acc = _add_term_dot(acc, t6, y, part, a_ptr, first, stride, tri, offs, mask, nt, 6)
    acc = _add_term_dot(acc, t7, y, part, a_ptr, first, stride, tri, offs, mask, nt, 7)
    acc = _add_term_dot(acc, t8, y, part, a_ptr, first, stride, tri, offs, mask, nt, 8)
    acc = _add_term_dot(acc, t9, y, part, a_ptr, first, stride, tri, offs, mask, nt, 9)
    acc = _add_term_dot(acc, t10, y, part, a_ptr, first, stride, tri, offs, mask, nt, 10)
    acc = _add_term_dot(acc, t11, y, part, a_ptr, first, stride, tri, offs, mask, nt, 11)
    acc = _add_term_dot(acc, t12, y, part, a_ptr, first, stride, tri, offs, mask, nt, 12)
    acc = _add_term_dot(acc, t13, y, part, a_ptr, first, stride, tri, offs, mask, nt, 13)
    acc = _add_term_dot(acc, t14, y, part, a_ptr, first, stride, tri, offs, mask, nt, 14)
    acc = _add_term_dot(acc, t15, y, part, a_ptr, first, stride, tri, offs, mask, nt, 15)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _padded(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """``TERMS`` pointer arguments: the live terms, then the first repeated (never read: ``nt`` skips them)."""
    return ts + [ts[0]] * (TERMS - len(ts))


def _launches(out: torch.Tensor, n: int, first: int, stride: int, tri: int):
    """Per launch: (start, its terms' count, where it writes, its alpha ``first`` and ``stride``).

    The last launch writes ``out``; earlier ones an fp32 scratch when ``out`` is in a lower precision, so that a
    chained sum is rounded once, at the end, as a single launch's is.
    """
    scratch = torch.empty_like(out, dtype=torch.float32) if n > TERMS and out.dtype != torch.float32 else out
    for k0 in range(0, n, TERMS):
        dst = out if k0 + TERMS >= n else scratch
        # term k0 + i sits at first + (k0 + i) stride + tri (k0 + i)(k0 + i - 1) / 2: a new first and stride
        yield k0, min(TERMS, n - k0), dst, first + k0 * stride + tri * (k0 * (k0 - 1) // 2), stride + tri * k0


def weighted_sum(
    base: torch.Tensor, ts: list[torch.Tensor], alpha: torch.Tensor, first: int, stride: int, tri: int
) -> torch.Tensor:
    """``base + sum_k alpha[idx(k)] * ts[k]`` (idx as in the module docstring) as a new tensor in base's layout.

    Every operand is dense and in base's layout (the caller checks); ``alpha`` is contiguous.
    """
    out = flat_view(torch.empty_like(base))
    terms, acc = [flat_view(t) for t in ts], flat_view(base)
    grid = (triton.cdiv(out.numel(), BLOCK),)
    for k0, nt, dst, a0, da in _launches(out, len(ts), first, stride, tri):
        _weighted_sum[grid](
            dst, acc, alpha, a0, da, tri, nt, out.numel(), *_padded(terms[k0 : k0 + nt]),
            HAS_ACC=True, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
        acc = dst
    return out.as_strided(base.shape, base.stride())


def weighted_sum_dots(
    y: torch.Tensor, gs: list[torch.Tensor], alpha: torch.Tensor, first: int, stride: int, tri: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``sum_k alpha[idx(k)] * gs[k]`` in y's layout, the dots ``<gs[k], y>`` in fp32, one per term)."""
    out = flat_view(torch.empty_like(y))
    terms, yf = [flat_view(g) for g in gs], flat_view(y)
    programs = triton.cdiv(out.numel(), BLOCK_DOTS)
    part = torch.empty((programs, len(gs)), dtype=torch.float32, device=y.device)
    acc = out
    for k0, nt, dst, a0, da in _launches(out, len(gs), first, stride, tri):
        _weighted_sum_dots[(programs,)](
            dst, acc, yf, part[:, k0:], part.stride(0), alpha, a0, da, tri, nt, out.numel(),
            *_padded(terms[k0 : k0 + nt]), HAS_ACC=k0 > 0, BLOCK=BLOCK_DOTS, num_warps=NUM_WARPS,
        )  # fmt: skip
        acc = dst
    return out.as_strided(y.shape, y.stride()), part.sum(0)
