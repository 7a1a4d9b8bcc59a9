"""The training loop: short, with features as callbacks (logging, checkpoints, telemetry live outside)."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import struct
import time
from dataclasses import InitVar, asdict, dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

from orchestrator.config.schema import Config
from orchestrator.train.mix import mix_batch

LOSS_TAIL = 100  # losses kept in the loop state and summary.json; the whole curve is in MLflow ("loss")


def chain_loss_digest(digest: str, loss: float) -> str:
    """The running digest after one more step: sha256(previous digest's bytes + the loss as little-endian
    float64). It starts from "" and covers every step's loss, bit for bit and in order, in constant space."""
    return hashlib.sha256(bytes.fromhex(digest) + struct.pack("<d", float(loss))).hexdigest()


@dataclass
class LoopState:
    """Everything the loop needs to continue exactly where it stopped (saved in every checkpoint).

    Its size does not grow with the run: the losses are a running digest plus the last ``LOSS_TAIL``.
    """

    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch
    step: int = 0  # optimizer steps
    samples: int = 0  # training images seen (global)
    nan_skipped: int = 0
    best_val_top1: float = -1.0
    loss_digest: str = ""  # chain_loss_digest over every step's loss: equal digests = bitwise equal curves
    loss_tail: list = field(default_factory=list)  # the last LOSS_TAIL step losses, oldest first
    layout: list = field(default_factory=list)  # [world size, micro-batch] that batch_in_epoch counts in
    last_eval: dict = field(default_factory=dict)  # the latest validation metrics
    # checkpoints written before the digest carry every loss: folded into digest and tail on load
    history: InitVar[list | None] = None

    def __post_init__(self, history: list | None) -> None:
        for loss in history or ():
            self.record_loss(loss)

    def record_loss(self, loss: float) -> None:
        """Add one optimizer step's loss to the digest and the tail."""
        self.loss_digest = chain_loss_digest(self.loss_digest, loss)
        self.loss_tail.append(float(loss))
        del self.loss_tail[:-LOSS_TAIL]

    def loss_summary(self) -> dict:
        """The loss fields of summary.json."""
        return {"final_train_loss": self.loss_tail[-1] if self.loss_tail else None,
                "loss_digest": self.loss_digest, "loss_tail": list(self.loss_tail)}

    def to_dict(self) -> dict:
        return asdict(self)


log = logging.getLogger("orchestrator.train")

# Fault injection for the reliability tests: a comma list of optimizer steps whose loss is made NaN.
_FAULT_NAN_STEPS = {int(v) for v in os.environ.get("ORCHESTRATOR_FAULT_NAN_STEPS", "").split(",") if v.strip()}


class Callback(Protocol):
    def on_step_end(self, state: LoopState, metrics: dict) -> None: ...
    def on_epoch_end(self, state: LoopState, metrics: dict) -> None: ...


class StopTraining(Exception):
    """Raised by the loop when a stop was requested; ``code`` is signals.INTERRUPT or REQUEUE."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class NonFiniteLoss(RuntimeError):
    pass


def loss_fn(cfg: Config, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out: [T, N, K] per-time-step logits. mean_output = CE of the rate-decoded mean; per_timestep = mean of
    each step's CE (TET-style). y: int64 labels [N] or class probabilities [N, K] (mixup/cutmix)."""
    ls = cfg.train.label_smoothing
    if cfg.train.loss == "per_timestep":
        T = out.shape[0]
        return F.cross_entropy(out.flatten(0, 1), y.repeat(T, *[1] * (y.ndim - 1)), label_smoothing=ls)
    return F.cross_entropy(out.mean(0), y, label_smoothing=ls)


def topk_correct(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    k = min(max(ks), logits.shape[-1])
    pred = logits.topk(k, dim=-1).indices
    hit = pred.eq(y[:, None])
    return [int(hit[:, : min(kk, k)].any(dim=1).sum()) for kk in ks]


def _all_sum(values: list[float]) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def to_device(x: torch.Tensor, y: torch.Tensor, device: str, channels_last: bool, dtype: torch.dtype):
    x = x.to(device, non_blocking=True).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(engine, loader, cfg: Config, device: str, dtype: torch.dtype) -> dict:
    """Top-1/top-5/loss over every validation sample once (counts summed across ranks)."""
    engine.eval()
    n = c1 = c5 = loss_sum = 0.0
    for x, y in loader:
        x, y = to_device(x, y, device, cfg.train.channels_last, dtype)
        out = engine(x).float()
        loss_sum += float(loss_fn(cfg, out, y)) * len(y)
        a, b = topk_correct(out.mean(0), y)
        c1, c5, n = c1 + a, c5 + b, n + len(y)
    n, c1, c5, loss_sum = _all_sum([n, c1, c5, loss_sum])
    engine.train()
    return {"val_top1": c1 / max(n, 1), "val_top5": c5 / max(n, 1), "val_loss": loss_sum / max(n, 1),
            "val_samples": n}


def train(engine, loaders, cfg: Config, state: LoopState, callbacks: list, stops, device: str,
          dtype: torch.dtype, world_size: int, accumulation: int) -> LoopState:
    """Run epochs from ``state`` until train.epochs or train.max_steps; callbacks see every step and epoch."""
    train_loader, val_loader = loaders
    engine.train()
    max_steps = cfg.train.max_steps or math.inf
    while state.epoch < cfg.train.epochs and state.step < max_steps:
        train_loader.set_epoch(state.epoch)
        train_loader.load_state_dict({"epoch": state.epoch, "batch": state.batch_in_epoch})
        t_data = time.perf_counter()
        t_step, waited = t_data, 0.0
        for x, y in train_loader:
            got = time.perf_counter()
            waited += got - t_data
            x, y = to_device(x, y, device, cfg.train.channels_last, dtype)
            target = y
            if cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0:
                x, target = mix_batch(x, y, cfg.model.num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha,
                                      cfg.train.seed, state.step, state.batch_in_epoch)
            out = engine(x)
            loss = loss_fn(cfg, out.float(), target)
            if state.step + 1 in _FAULT_NAN_STEPS:
                _FAULT_NAN_STEPS.discard(state.step + 1)  # once: a skipped step is retried with the next batch
                loss = loss * float("nan")
            if not _all_finite(loss):
                # Every rank sees the same verdict, so all skip (or all stop) together.
                _handle_nonfinite(cfg, state)
                state.batch_in_epoch += 1
                t_data = time.perf_counter()
                continue
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            engine.step()
            state.batch_in_epoch += 1
            state.samples += len(y) * world_size
            if not boundary:
                t_data = time.perf_counter()
                continue
            state.step += 1
            now = time.perf_counter()
            top1, top5 = topk_correct(out.detach().float().mean(0), y)
            metrics = {"loss": float(loss.detach()), "lr": engine.get_lr()[0], "train_top1": top1 / len(y),
                       "train_top5": top5 / len(y), "step_time_s": now - t_step,
                       "images_per_sec": len(y) * world_size * accumulation / max(now - t_step, 1e-9),
                       "data_wait_frac": waited / max(now - t_step, 1e-9), "nan_skipped": state.nan_skipped}
            state.record_loss(metrics["loss"])
            for cb in callbacks:
                cb.on_step_end(state, metrics)
            code = stops.agreed()
            if code:
                raise StopTraining(code)
            if state.step >= max_steps:
                break
            t_step = t_data = time.perf_counter()
            waited = 0.0
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
            due = state.epoch % cfg.train.eval_every_epochs == 0 or state.epoch == cfg.train.epochs
            metrics = evaluate(engine, val_loader, cfg, device, dtype) if due else {}
            if metrics:
                state.last_eval = {k: metrics[k] for k in ("val_top1", "val_top5", "val_loss")}
            for cb in callbacks:
                cb.on_epoch_end(state, metrics)
            continue
        break  # max_steps reached mid-epoch
    return state


def _all_finite(loss: torch.Tensor) -> bool:
    bad = torch.tensor([0 if bool(torch.isfinite(loss.detach())) else 1], dtype=torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return not int(bad)


def _handle_nonfinite(cfg: Config, state: LoopState) -> None:
    """NaN/Inf loss: 'stop' ends the run keeping the last good checkpoint; 'skip' drops the micro-batch with
    no backward and no update (up to nan_skip_limit times)."""
    if cfg.train.nan_policy == "stop":
        raise NonFiniteLoss(f"non-finite loss at step {state.step + 1}; stopping (train.nan_policy=stop), "
                            "the last good checkpoint is kept")
    state.nan_skipped += 1
    log.warning("non-finite loss before step %d: micro-batch skipped (%d of at most %d, train.nan_policy=skip)",
                state.step + 1, state.nan_skipped, cfg.train.nan_skip_limit)
    if state.nan_skipped > cfg.train.nan_skip_limit:
        raise NonFiniteLoss(f"non-finite loss {state.nan_skipped} times, over train.nan_skip_limit="
                            f"{cfg.train.nan_skip_limit}; stopping")
