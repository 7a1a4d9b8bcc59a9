"""Training figures kept on the device between sync points, and the non-finite verdict decided there too.

A step reads nothing on the host: its loss, top-1/top-5 hits and the non-finite flag stay device tensors, and the
flag (all-reduced on the device, so every rank agrees) skips the optimizer update in the optimizer's own kernel
(engine.StepSkip). ``flush`` reads every pending step in one transfer, at a sync point (every
``train.log_every_steps``, before a checkpoint, at the end of an epoch or of the run, on a stop), and applies
``train.nan_policy`` to what it finds: ``skip`` counts the step (its update did not happen), ``stop`` ends the run
naming the first bad step, before any later checkpoint is written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from orchestrator.train import dist

log = logging.getLogger("orchestrator.train")


class NonFiniteLoss(RuntimeError):
    """A non-finite loss ended the run; ``rows``: the steps read before it, still to be reported."""

    def __init__(self, message: str, rows: list[dict] | None = None):
        super().__init__(message)
        self.rows = rows or []


def topk_hits(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> torch.Tensor:
    """How many rows of ``logits`` [N, K] have label ``y`` among their top k, for each k (a device tensor)."""
    k = min(max(ks), logits.shape[-1])
    hit = logits.topk(k, dim=-1).indices.eq(y[:, None])
    return torch.stack([hit[:, : min(kk, k)].any(dim=1).sum() for kk in ks])


@dataclass
class _Row:
    step: int
    epoch: int
    images: int  # this rank's images in the step's last micro-batch (the accuracy's denominator)
    lr: float
    values: torch.Tensor  # device: [loss, top-1 hits, top-5 hits, skipped 0/1]


class StepMetrics:
    """Per-step figures on ``device``; the loop calls micro_batch / before_step / end_step, then flush."""

    def __init__(self, device: str, step_skip=None, nan_policy: str = "stop", nan_skip_limit: int = 0):
        self.device, self.step_skip = device, step_skip
        self.nan_policy, self.nan_skip_limit = nan_policy, nan_skip_limit
        self.bad = torch.zeros((), device=device)  # this rank's verdict over the current step's micro-batches
        self.verdict = self.bad
        self.rows: list[_Row] = []
        self.window_start = time.perf_counter()
        self.data_wait = 0.0

    def restart_window(self) -> None:
        """Time from now (a new epoch: evaluation and epoch-end callbacks do not count as step time)."""
        self.window_start, self.data_wait = time.perf_counter(), 0.0

    def micro_batch(self, loss: torch.Tensor) -> None:
        self.bad = torch.maximum(self.bad, (~torch.isfinite(loss.detach())).float())

    def before_step(self) -> None:
        """At an accumulation boundary, before engine.step(): every rank's verdict, on the device; the optimizer
        skips the update where any rank saw a non-finite loss."""
        self.verdict = dist.all_reduce(self.bad.clone(), "max")
        if self.step_skip is not None:
            self.step_skip.set(self.verdict)

    def end_step(self, step: int, epoch: int, loss: torch.Tensor, out: torch.Tensor, y: torch.Tensor,
                 lr: float) -> None:
        hits = topk_hits(out.detach().float().mean(0), y)
        values = torch.cat([loss.detach().float().reshape(1), hits.float(), self.verdict.reshape(1)])
        self.rows.append(_Row(step, epoch, len(y), lr, values))
        self.bad = torch.zeros((), device=self.device)

    def flush(self, state, world_size: int, accumulation: int) -> list[dict]:
        """Read the pending steps (one host transfer) and apply the non-finite policy; returns one metrics dict per
        step. Timing figures are the window's means (a step's own host time says nothing while the device runs
        behind). Raises NonFiniteLoss under nan_policy=stop or past nan_skip_limit, carrying the steps before."""
        if not self.rows:
            return []
        values = torch.stack([r.values for r in self.rows]).tolist()
        wall = max(time.perf_counter() - self.window_start, 1e-9)
        n = len(self.rows)
        timing = {"step_time_s": wall / n,
                  "images_per_sec": sum(r.images for r in self.rows) * world_size * accumulation / wall,
                  "data_wait_frac": self.data_wait / wall}
        out = []
        for row, (loss, top1, top5, skipped) in zip(self.rows, values, strict=True):
            m = {"step": row.step, "epoch": row.epoch, "lr": row.lr, **timing}
            if skipped:
                try:
                    self._nonfinite(state, row.step)
                except NonFiniteLoss as e:
                    self.rows.clear()
                    raise NonFiniteLoss(str(e), out) from None
            else:
                m.update(loss=loss, train_top1=top1 / row.images, train_top5=top5 / row.images)
                state.record_loss(loss)
            m["nan_skipped"] = state.nan_skipped
            out.append(m)
        self.rows.clear()
        self.restart_window()
        return out

    def _nonfinite(self, state, step: int) -> None:
        if self.nan_policy == "stop":
            raise NonFiniteLoss(f"non-finite loss at step {step}; stopping (train.nan_policy=stop), the last good "
                                "checkpoint is kept")
        state.nan_skipped += 1
        log.warning("non-finite loss at step %d: micro-batch skipped, no update (%d of at most %d, "
                    "train.nan_policy=skip)", step, state.nan_skipped, self.nan_skip_limit)
        if state.nan_skipped > self.nan_skip_limit:
            raise NonFiniteLoss(f"non-finite loss {state.nan_skipped} times, over train.nan_skip_limit="
                                f"{self.nan_skip_limit}; stopping")
