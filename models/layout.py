"""Memory layout helpers: keep whatever layout the activations come in (channels_last or not), never convert.

The networks hold activations as ``[T, N, C, H, W]`` sequences whose per-step blocks ``[N, C, H, W]`` are dense in
some physical order (NCHW, or NHWC for channels_last). The time dim may also have stride 0: the static image's
stem output is repeated over T as a broadcast view. These helpers allocate outputs and flatten sequences in the
input's own physical order, so no op in between silently turns channels_last back into NCHW (a copy, and on a
GPU a layout conversion around every convolution).
"""

from __future__ import annotations

import torch


def physical_order(t: torch.Tensor) -> list[int]:
    """Dims of ``t`` from outermost to innermost in memory; broadcast (stride 0) dims count as outermost.

    Ties (size-1 dims) keep their logical order, so a contiguous tensor gives ``[0, 1, ..., ndim - 1]``.
    """
    strides = t.stride()

    def key(d: int) -> tuple[bool, int, int]:
        return (strides[d] != 0, -strides[d], d)

    return sorted(range(t.dim()), key=key)


def empty_step_like(x_seq: torch.Tensor) -> torch.Tensor:
    """An uninitialised dense ``x_seq[0]``-shaped tensor in the physical order of ``x_seq``'s steps."""
    step = x_seq[0]
    return torch.empty_permuted(step.shape, physical_order(step), dtype=x_seq.dtype, device=x_seq.device)


def empty_seq_like(x_seq: torch.Tensor) -> torch.Tensor:
    """An uninitialised dense tensor shaped like ``x_seq``: time outermost, each step in ``x_seq[0]``'s order.

    For a dense input this is ``empty_like`` (same strides); for a broadcast-over-T input (stride 0) it is the
    dense tensor the broadcast stands for, not a contiguous NCHW one.
    """
    order = [0] + [1 + d for d in physical_order(x_seq[0])]
    return torch.empty_permuted(x_seq.shape, order, dtype=x_seq.dtype, device=x_seq.device)


def same_step_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape) address their elements identically (size-1 dims ignored)."""
    return a.shape == b.shape and all(
        n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride(), strict=True)
    )


def dense_seq(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is a dense sequence (time stride = one dense step), else such a copy in its steps' order."""
    if t.stride(0) == t[0].numel() and is_dense(t[0]):
        return t
    return empty_seq_like(t).copy_(t)


def seq_operand(t: torch.Tensor, ref_step: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``t`` and its time stride if each of its steps is laid out as ``ref_step`` (dense); else a dense copy that
    is. For kernels that address a sequence as ``base + t * time_stride + i`` (0 for a broadcast over T)."""
    if same_step_layout(t[0], ref_step):
        return t, t.stride(0)
    out = torch.empty((t.shape[0], *ref_step.shape), dtype=t.dtype, device=t.device)
    out = out.as_strided(t.shape, (ref_step.numel(), *ref_step.stride()))
    out.copy_(t)
    return out, ref_step.numel()


def step_operand(t: torch.Tensor, ref_step: torch.Tensor) -> torch.Tensor:
    """``t`` if it is laid out as ``ref_step`` (dense), else a copy that is."""
    if same_step_layout(t, ref_step):
        return t
    out = torch.empty_like(ref_step, dtype=t.dtype)  # ref_step is dense: empty_like keeps its strides
    return out.copy_(t)


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill ``numel`` consecutive slots in some dim order."""
    return t.permute(physical_order(t)).is_contiguous()


def flat_view(t: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of a dense ``t`` in its physical order (no copy), or None when ``t`` is not dense."""
    p = t.permute(physical_order(t))
    return p.view(-1) if p.is_contiguous() else None


def flat_seq(x_seq: torch.Tensor) -> torch.Tensor:
    """``[T, N, ...] -> [T * N, ...]``: a view where one exists, else a dense copy in the steps' physical order.

    (``flatten`` on a broadcast-over-T sequence copies into contiguous NCHW and drops channels_last.)
    """
    t, n = x_seq.shape[0], x_seq.shape[1]
    if t == 1 or n == 1 or x_seq.stride(0) == x_seq.stride(1) * n:
        return x_seq.flatten(0, 1)
    out = empty_seq_like(x_seq)
    out.copy_(x_seq)
    return out.flatten(0, 1)


def stack_like(steps: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(steps)`` whose steps keep the first step's physical order (stack itself returns NCHW)."""
    order = physical_order(steps[0])
    stacked = torch.stack([s.permute(order) for s in steps])
    return stacked.permute(0, *[1 + order.index(d) for d in range(steps[0].dim())])


class _RepeatTime(torch.autograd.Function):
    """``y`` repeated over a new leading time dim as a broadcast view; backward sums over time into ``y``'s layout
    (autograd's own sum for ``expand`` writes a new NCHW tensor whatever the layout)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, steps: int) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.stride = y.shape, y.stride()
        return y.unsqueeze(0).expand(steps, *y.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        if torch.compiler.is_compiling():  # the compiler picks the layout itself (and refuses strided out=)
            return g.sum(0), None
        out = torch.empty_strided(ctx.shape, ctx.stride, dtype=g.dtype, device=g.device)
        return torch.sum(g, 0, out=out), None


def repeat_time(y: torch.Tensor, steps: int) -> torch.Tensor:
    """``[N, ...] -> [steps, N, ...]``: the same tensor at every time step, no copy (``y`` dense)."""
    if not is_dense(y):
        y = y.contiguous()
    return _RepeatTime.apply(y, steps)


class _SpatialMean(torch.autograd.Function):
    """Mean over the last two dims; backward spreads the gradient in the input's layout (mean's own backward
    broadcasts into a new NCHW tensor, which would carry NCHW gradients into a channels_last network)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.shape, ctx.stride = x.shape, x.stride()
        return x.mean((-2, -1))

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        out = torch.empty_strided(ctx.shape, ctx.stride, dtype=g.dtype, device=g.device)
        return out.copy_((g / (ctx.shape[-1] * ctx.shape[-2]))[..., None, None].expand(ctx.shape))


def spatial_mean(x: torch.Tensor) -> torch.Tensor:
    """``x.mean((-2, -1))`` whose gradient keeps ``x``'s memory layout (``x`` dense)."""
    if not is_dense(x):
        x = x.contiguous()
    return _SpatialMean.apply(x)
