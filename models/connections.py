"""Residual connections of spiking ResNets, one enum, and the densely additive (DA) aggregation.

Notation: ``F_l`` is block l's residual branch, ``SN`` a spiking neuron, ``P`` a stage's projection shortcut.

    spiking   (post-activation Spiking ResNet)   x_l = SN(F_l(x_{l-1}) + x_{l-1})    branch: [conv BN SN]* conv BN
    sew_add   (SEW-ResNet ADD)                   x_l = SN(F_l(x_{l-1})) + x_{l-1}    branch: [conv BN SN]+
    sew_iand  (SEW-ResNet IAND)                  x_l = x_{l-1} * (1 - SN(F_l(x_{l-1})))
    membrane  (MS-ResNet membrane shortcut)      x_l = F_l(x_{l-1}) + x_{l-1}        branch: [SN conv BN]+ (real stream)
    da        (densely additive, DANet)          see below

In the first block of a stage whose shape changes, ``x_{l-1}`` on the shortcut becomes ``P(x)``: conv1x1(stride) +
BN (+ SN for the spiking domain: SEW's downsample), the standard projection shortcut.

DA (our reading of Li, Lei, Yang 2023; definitions in ../shared/reference/DANET.md). Within a stage of L blocks,
with ``s_0`` the stage's base and ``x_in`` the stage input:

    y_1 = F_1(x_in)            y_l = F_l(s_{l-1})   (l > 1)
    s_l = s_0 + sum_{k <= l} alpha_{l,k} * y_k       alpha: one scalar per edge, learnable, initialised to 1

``da.weights = fixed`` sets every alpha to 1, which is exactly the identity-residual stream ``s_l = s_{l-1} + y_l``
(computed incrementally, without keeping the y_k). The four DANet architectures are domain x span:

* ``da.domain = spike``: branches end in a neuron and spikes are added (SEW-ADD style branch [conv BN SN]+);
  ``da.domain = membrane``: the stream is real-valued and branches start with a neuron (branch [SN conv BN]+).
* ``da.span = stage``: dense within each stage; ``s_0 = P(x_in)`` with the standard projection shortcut of the
  domain (SEW's conv-BN-SN for spike, conv-BN for membrane), or ``x_in`` where the shape is unchanged.
  With fixed weights this network *is* SEW-ADD (spike) or MS-ResNet (membrane), weight for weight.
  ``da.span = network``: also dense across stages. Each finished stage's aggregate ``S_i`` (its last ``s_L``) is
  carried to every later stage j through its own linear projection ``Q_{i->j}`` = avgpool(2^(j-i)) + conv1x1 +
  BN, no neuron, and the base of stage j is their sum:  ``s_0^(j) = sum_{i<j} Q_{i->j}(S_i)``  (for the first
  stage: the stem output, projected by conv1x1 + BN where the width changes). Nothing non-additive sits on any
  shortcut path; the BN scale of each projection is that edge's learnable weight.

Costs: learnable DA keeps a stage's branch outputs alive until the stage ends and does l multiply-adds for block l
(O(L^2) elementwise work per stage, e.g. 666 for DANet-152's 36-block stage 3); ``fixed`` is as cheap as a ResNet.
As torch ops each term is a pass over the stream (3 tensor reads/writes forward, 5 backward); ``model.fuse_da``
sums up to 16 terms per pass with Triton kernels on CUDA (``_da_triton``: ~1 read per term either way).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from .layout import flat_view, same_step_layout
from .neuron_spec import spec_from_any


class Connection(str, Enum):
    """How a block's branch output is combined with the stream (see the module docstring)."""

    SPIKING = "spiking"
    SEW_ADD = "sew_add"
    SEW_IAND = "sew_iand"
    MEMBRANE = "membrane"
    DA = "da"

    @classmethod
    def parse(cls, value: Any) -> Connection:
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value))
        except ValueError:
            valid = ", ".join(c.value for c in cls)
            raise ValueError(f"connection={value!r}: expected one of {valid} (or 'default')") from None


DA_CHOICES = {
    "domain": ("spike", "membrane"),
    "span": ("stage", "network"),
    "weights": ("learnable", "fixed"),
}


@dataclass
class DASpec:
    """``model.da``: the DA variant. Defaults are the DANet default (membrane / network / learnable)."""

    domain: str = "membrane"
    span: str = "network"
    weights: str = "learnable"

    def __post_init__(self) -> None:
        problems = [
            f"da.{key}={getattr(self, key)!r}: expected one of {', '.join(valid)}"
            for key, valid in DA_CHOICES.items()
            if getattr(self, key) not in valid
        ]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_any(cls, value: Any) -> DASpec:
        return spec_from_any(cls, value, "da")


def domain_of(connection: Connection, da: DASpec) -> str:
    """'spike' when branches end in a neuron (post-activation counts too), 'membrane' for a real-valued stream."""
    if connection is Connection.MEMBRANE or (connection is Connection.DA and da.domain == "membrane"):
        return "membrane"
    return "spike"


class GradStash:
    """The stream gradients ``g_l = dL/ds_l`` of one stage's backward, shared by its aggregations (one per forward)."""

    def __init__(self) -> None:
        self.g: dict[int, torch.Tensor] = {}


class _DenseAggregate(torch.autograd.Function):
    """``s_l = base + sum_k alpha_{l,k} y_k`` with a backward that keeps O(L) tensors per stage, not O(2L).

    Plain autograd gives every ``y_k`` a gradient buffer as soon as ``s_L``'s backward runs (``alpha_{L,k} g_L``)
    while all the ``y_k`` are still saved: 2L full-size tensors live at the start of a stage's backward. Here
    ``s_l``'s backward only records ``g_l`` in the stage's stash and returns the gradient of its own newest
    input ``y_l``, complete, because every ``g_m`` (m >= l) is known by then (``s_l`` feeds block l+1, whose
    backward precedes this one): ``dL/dy_l = sum_{m>=l} alpha_{m,l} g_m`` and ``dL/dalpha_{m,l} = <g_m, y_l>``.
    Each node saves only its own ``y_l``, so at block l's backward y_1..y_l and g_l..g_L are live: L+1 tensors.
    """

    @staticmethod
    def forward(ctx, base, alpha, stash, row, fused, *ys):  # type: ignore[override]
        ctx.stash, ctx.row, ctx.index, ctx.fused = stash, row, len(ys), fused
        ctx.save_for_backward(ys[-1], alpha)
        return _weighted_sum(base, list(ys), alpha, row, fused)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        y, alpha = ctx.saved_tensors
        stash, j = ctx.stash, ctx.index  # this node computed s_j (1-based j = number of ys)
        if (ctx.fused and _on_device(g) and g.shape == y.shape
                and not (same_step_layout(g, y) and flat_view(g) is not None)):
            g = torch.empty_like(y, dtype=g.dtype).copy_(g)  # once, in y's layout: the kernels read g_j j times
        stash.g[j] = g
        ms = [m for m in sorted(stash.g) if m >= j]  # s_m = base + ... + alpha_{m,j} y_j + ...  (m = j, j+1, ..)
        gms = [stash.g[m] for m in ms]
        if j == 1:
            stash.g.clear()  # the stage's backward is done
        grad_y, grad_alpha = _column_grads(y, ms, gms, alpha, j, ctx.fused)
        return (g, grad_alpha, None, None, None) + (None,) * (j - 1) + (grad_y,)


def _weighted_sum(base, ys: list[torch.Tensor], alpha, row: int, fused: bool) -> torch.Tensor:
    """``base + sum_k alpha[row + k] ys[k]``: the kernel where it applies, else in-place addcmuls (no new
    stream-sized tensor per term)."""
    if fused and _counted("forward", _kernels_apply(base, *ys)):
        got = _try_kernels("forward", lambda: _kernels().weighted_sum(base, ys, alpha, row, 1, 0))
        if got is not None:
            return got
    acc = torch.addcmul(base, ys[0], alpha[row])
    for k in range(1, len(ys)):
        acc.addcmul_(ys[k], alpha[row + k])
    return acc


def _column_grads(y, ms: list[int], gms: list[torch.Tensor], alpha, j: int, fused: bool):
    """(dL/dy_j = sum_m alpha_{m,j} g_m, dL/dalpha with <g_m, y_j> at each alpha_{m,j}) over ``ms`` = j, j+1, ..."""
    if fused and _counted("backward", ms == list(range(j, j + len(ms))) and _kernels_apply(y, *gms)):
        # column j of the alphas, rows m = j..: index m (m - 1) / 2 + j - 1 = first + k j + k (k - 1) / 2
        first = j * (j - 1) // 2 + j - 1
        got = _try_kernels("backward", lambda: _kernels().weighted_sum_dots(y, gms, alpha, first, j, 1))
        if got is not None:
            grad_y, dots = got
            index = _column_index(j, len(ms), alpha.device)
            return grad_y, torch.zeros_like(alpha).index_copy_(0, index, dots.to(alpha.dtype))
    grad_alpha = torch.zeros_like(alpha)
    grad_y = None
    for m, gm in zip(ms, gms, strict=True):
        a = alpha[m * (m - 1) // 2 + j - 1]
        grad_y = gm * a if grad_y is None else grad_y.addcmul_(gm, a)
        grad_alpha[m * (m - 1) // 2 + j - 1] = _dot(gm, y.to(gm.dtype)).to(alpha.dtype)
    return grad_y, grad_alpha


_KERNEL_STATE: dict[str, object] = {}


def _kernels():
    from . import _da_triton

    return _da_triton


def _kernels_apply(*ts: torch.Tensor) -> bool:
    """Whether the Triton kernels can sum ``ts``: CUDA, one dtype, one shape, dense, one layout (else torch ops)."""
    first = ts[0]
    if not _on_device(first) or _KERNEL_STATE.get("ok") is False:
        return False
    if "ok" not in _KERNEL_STATE:
        try:
            _kernels()
            _KERNEL_STATE["ok"] = True
        except Exception as exc:  # no triton or an incompatible one: the torch ops are exact too
            _KERNEL_STATE["ok"], _KERNEL_STATE["failed"] = False, repr(exc)
            return False
    return flat_view(first) is not None and all(
        _on_device(t) and t.dtype == first.dtype and t.shape == first.shape and same_step_layout(t, first)
        and flat_view(t) is not None
        for t in ts[1:]
    )  # fmt: skip


# How often a fused sum took the kernels or torch ops (another dtype or layout), per direction: the GPU check
# reports it, so a layout that silently misses the kernels shows.
COUNTS: dict[str, int] = {}


def _counted(direction: str, kernels: bool) -> bool:
    key = f"{direction} {'kernels' if kernels else 'torch'}"
    COUNTS[key] = COUNTS.get(key, 0) + 1
    return kernels


def _try_kernels(what: str, fn):
    """``fn()``, or None after a failure, which is warned about once and turns the kernels off for the process."""
    try:
        return fn()
    except Exception as exc:
        _KERNEL_STATE["ok"], _KERNEL_STATE["failed"] = False, repr(exc)
        warnings.warn(f"Triton DA {what} kernel failed ({exc!r}); using torch ops", stacklevel=3)
        return None


def _on_device(t: torch.Tensor) -> bool:
    """Where the kernels run (tools/lif_triton_check.py widens it to CPU tensors for Triton's interpreter)."""
    return t.is_cuda


@functools.cache
def _column_index(j: int, rows: int, device: torch.device) -> torch.Tensor:
    """Positions of alpha_{m,j} for m = j .. j + rows - 1 in the flat alpha vector (built once per device)."""
    return torch.tensor([m * (m - 1) // 2 + j - 1 for m in range(j, j + rows)], device=device)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """<a, b> over all elements without copying either (``reshape(-1)`` copies a channels_last tensor)."""
    fa, fb = flat_view(a), flat_view(b)
    if fa is not None and fb is not None and same_step_layout(a, b):
        return torch.dot(fa, fb)
    return (a * b).sum()  # layouts differ (not seen in the networks): one temporary, no layout conversion


class DenseWeights(nn.Module):
    """The alphas of one stage: a flat vector holding row l (l entries) for each block l, initialised to 1."""

    def __init__(self, num_blocks: int) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.alpha = nn.Parameter(torch.ones(num_blocks * (num_blocks + 1) // 2))
        self.fused = False  # ``model.fuse_da``: the sums as Triton kernels on CUDA (``models._da_triton``)

    def aggregate(self, base: torch.Tensor, ys: list[torch.Tensor], stash: GradStash | None = None) -> torch.Tensor:
        """s_l = base + sum_k alpha_{l,k} y_k for l = len(ys), summed in order (alpha = 1 gives the stream).

        ``stash``: one ``GradStash`` per stage forward, shared by all its aggregations (see ``_DenseAggregate``);
        every s_1..s_L of the stage must then be aggregated with it, in order. Without one: plain autograd.
        """
        row = len(ys) * (len(ys) - 1) // 2
        # Under torch.compile the plain chain is traced instead: the stash is shared Python state between backward
        # nodes, which a traced graph cannot hold, and the compiler plans the backward's buffers itself.
        compiling, grad = torch.compiler.is_compiling(), torch.is_grad_enabled()
        if stash is not None and grad and not compiling:
            return _DenseAggregate.apply(base, self.alpha, stash, row, self.fused, *ys)
        if self.fused and not grad and not compiling:  # evaluation, a checkpoint's first forward
            return _weighted_sum(base, ys, self.alpha, row, True)
        acc = base
        for k, y in enumerate(ys):
            acc = torch.addcmul(acc, y, self.alpha[row + k])
        return acc

    def extra_repr(self) -> str:
        return f"num_blocks={self.num_blocks}"
