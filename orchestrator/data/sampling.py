"""Which samples a rank reads in which batch, and their augmentation parameters; pure numpy, no DALI.

Per epoch the dataset order is a permutation drawn from ``(seed, epoch)`` (training) or the identity
(validation). Rank ``r`` of ``W`` takes every W-th sample from position ``r``, so across ranks each sample is read
exactly once per epoch. Every rank runs the same number of steps ``S = ceil(ceil(N / W) / B)``, rounded up to a
multiple of the gradient accumulation when there is one (so that an epoch ends on an optimizer step: micro-batches
left over would carry their gradients into the next epoch, and a resume would drop them); a rank's batches are
full except at the end, where sizes shrink just enough that no batch is ever empty.

Augmentation parameters (random-resized-crop window, horizontal flip) come from a generator seeded with
``(seed, epoch, sample index)``: they do not depend on the rank, the world size or where a run resumed.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["ShardPlan", "consumed_samples", "epoch_order", "full_layout", "translate_position", "train_params",
           "val_crop"]

_AUG_STREAM = 0xDA7A


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, 0x5EED])
    return rng.permutation(n).astype(np.int64)


class ShardPlan:
    """Batches of sample indices for one rank, per epoch."""

    def __init__(self, n: int, rank: int, world_size: int, batch_size: int, seed: int, shuffle: bool,
                 multiple: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in a world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        if n < world_size:
            raise ValueError(
                f"{n} samples cannot be spread over {world_size} ranks (each needs at least one)"
            )
        self.per_rank = n // world_size + (1 if rank < n % world_size else 0)
        multiple = max(1, int(multiple))
        self.steps = math.ceil(math.ceil(n / world_size) / batch_size / multiple) * multiple
        if n // world_size < self.steps:
            accumulation = f" in whole accumulations of {multiple}" if multiple > 1 else ""
            raise ValueError(
                f"{n} samples over {world_size} ranks at batch {batch_size}: the ranks cannot run the same "
                f"number of non-empty steps{accumulation}; use a larger batch or a world size dividing {n}"
            )
        self.sizes = self._sizes(self.per_rank)

    def _sizes(self, count: int) -> list[int]:
        sizes, left = [], count
        for k in range(self.steps):
            s = min(self.batch_size, left - (self.steps - k - 1))
            sizes.append(s)
            left -= s
        assert left == 0 and min(sizes) >= 1
        return sizes

    def __len__(self) -> int:
        return self.steps

    def batches(self, epoch: int) -> list[np.ndarray]:
        mine = epoch_order(self.n, self.seed, epoch, self.shuffle)[self.rank :: self.world_size]
        bounds = np.cumsum([0] + self.sizes)
        return [mine[bounds[k] : bounds[k + 1]] for k in range(self.steps)]


def consumed_samples(n: int, world_size: int, batch_size: int, batches: int, multiple: int = 1) -> int:
    """Samples all ranks together have read after ``batches`` batches of an epoch."""
    return int(_consumed_by_batch(n, world_size, batch_size, multiple)[batches])


def _consumed_by_batch(n: int, world_size: int, batch_size: int, multiple: int = 1) -> np.ndarray:
    """Entry k: samples all ranks together have read after k batches (k = 0 .. steps)."""
    sizes = [ShardPlan(n, r, world_size, batch_size, 0, False, multiple).sizes for r in range(world_size)]
    return np.concatenate([[0], np.cumsum(np.sum(sizes, axis=0))])


def full_layout(layout) -> tuple[int, int, int]:
    """(world size, batch, accumulation) from a layout as a checkpoint keeps it; one saved before accumulation
    was kept, (world size, batch), has 1."""
    return tuple((*layout, 1)[:3])


def translate_position(n: int, old: tuple[int, ...], new: tuple[int, ...], batches: int) -> int:
    """The batch index in layout ``new`` = (world size, batch[, accumulation]) at which layout ``old`` stood
    after ``batches`` (a layout without accumulation, as checkpoints before it was kept, has 1).

    Rank r takes every W-th sample of the epoch's order, so the first k full batches of all ranks together are
    the order's first k * W * B samples whatever W and B are: a run resumed with another world size (same global
    batch) reads exactly the samples the original would have read, step for step. Raises ValueError when the
    position falls between two batches of the new layout.
    """
    old, new = full_layout(old), full_layout(new)
    if old == new:
        return batches
    done = consumed_samples(n, old[0], old[1], batches, old[2])
    cumulative = _consumed_by_batch(n, *new)
    k = int(np.searchsorted(cumulative, done))
    if k < len(cumulative) and cumulative[k] == done:
        return k
    raise ValueError(
        f"the checkpoint stopped {done} samples into its epoch ({old[0]} ranks x batch {old[1]}), which is not a "
        f"batch boundary for {new[0]} ranks x batch {new[1]}; resume with a layout whose ranks x batch divides "
        f"{done}, or from an epoch-end checkpoint"
    )


def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch & 0xFFFFFFFF, int(index), _AUG_STREAM])


def rrc_window(
    rng: np.random.Generator, width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A random-resized-crop window (x, y, w, h) as torchvision draws it: 10 tries, then a center crop."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_r[0], log_r[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            y = int(rng.integers(0, height - h + 1))
            x = int(rng.integers(0, width - w + 1))
            return x, y, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    w, h = max(1, min(w, width)), max(1, min(h, height))
    return (width - w) // 2, (height - h) // 2, w, h


def train_params(
    seed: int,
    epoch: int,
    indices: np.ndarray,
    widths: list[int],
    heights: list[int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sample: crop anchor (x, y), crop shape (w, h) as float32 [B, 2], and flip flags int32 [B]."""
    b = len(indices)
    anchors = np.empty((b, 2), np.float32)
    shapes = np.empty((b, 2), np.float32)
    flips = np.zeros(b, np.int32)
    for k, (i, w, h) in enumerate(zip(np.asarray(indices).tolist(), widths, heights, strict=True)):
        rng = _rng(seed, epoch, i)
        x, y, cw, ch = rrc_window(rng, int(w), int(h), scale, ratio)
        anchors[k] = (x, y)
        shapes[k] = (cw, ch)
        if hflip:
            flips[k] = int(rng.random() < 0.5)
    return anchors, shapes, flips


def val_crop(width: int, height: int, resize: int, size: int) -> tuple[int, int, int, int]:
    """The window (x, y, w, h) in original pixels that a shorter-side resize then center crop keeps."""
    s = resize / min(width, height)
    w, h = min(width, size / s), min(height, size / s)
    return int(round((width - w) / 2)), int(round((height - h) / 2)), int(round(w)), int(round(h))
