"""The training loop: short, with features as callbacks (logging, checkpoints, telemetry live outside).

Nothing inside a step waits for the device: the step's figures and its non-finite verdict stay on the device
(metrics.StepMetrics) and are read at sync points, every ``train.log_every_steps`` and wherever state leaves
the loop (a checkpoint, an epoch's end, the run's end, a stop). Callbacks see every step (``on_step_end``, host
state only) and the figures of each step at the next sync point (``on_log``).
"""

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
import torch.nn.functional as F

from orchestrator.config.schema import Config
from orchestrator.train import dist
from orchestrator.train.metrics import NonFiniteLoss, StepMetrics, topk_hits
from orchestrator.train.mix import mix_batch
from orchestrator.train.precision import FP32, Precision
from orchestrator.train.stall import StallWatch

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
    layout: list = field(default_factory=list)  # [world size, micro-batch, accumulation] that batch_in_epoch counts in
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
# ... and "STEP:SECONDS": that optimizer step stalls for SECONDS before its forward, as on a hung read.
_FAULT_STALL = tuple(float(v) for v in os.environ.get("ORCHESTRATOR_FAULT_STALL", "").split(":") if v.strip())


def _injected_stall(seconds: float) -> None:  # named: the stall report's stack must point here
    time.sleep(seconds)

__all__ = ["LoopState", "NonFiniteLoss", "StopTraining", "evaluate", "loss_fn", "to_device", "train"]


class Callback(Protocol):
    """Any of the three hooks; a callback leaves out the ones it does not need."""

    def on_step_end(self, state: LoopState, metrics: dict) -> None: ...  # every step; metrics: host values only
    def on_log(self, state: LoopState, rows: list[dict]) -> None: ...  # at a sync point: each step's figures
    def on_epoch_end(self, state: LoopState, metrics: dict) -> None: ...


class StopTraining(Exception):
    """Raised by the loop when a stop was requested; ``code`` is signals.INTERRUPT or REQUEUE."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


def loss_fn(cfg: Config, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out: [T, N, K] per-time-step logits. mean_output = CE of the rate-decoded mean; per_timestep = mean of
    each step's CE (TET-style). y: int64 labels [N] or class probabilities [N, K] (mixup/cutmix)."""
    ls = cfg.train.label_smoothing
    if cfg.train.loss == "per_timestep":
        T = out.shape[0]
        return F.cross_entropy(out.flatten(0, 1), y.repeat(T, *[1] * (y.ndim - 1)), label_smoothing=ls)
    return F.cross_entropy(out.mean(0), y, label_smoothing=ls)


def to_device(x: torch.Tensor, y: torch.Tensor, device: str, channels_last: bool, dtype: torch.dtype):
    """A batch on the training device; ``channels_last``: the images in NHWC order, which every convolution's
    output then follows (the parameters stay contiguous: engine.prepare_model)."""
    x = x.to(device, non_blocking=True).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(engine, loader, cfg: Config, device: str, precision: Precision = FP32) -> dict:
    """Top-1/top-5/loss over every validation sample once: counts summed on the device, across ranks, and read
    once at the end."""
    engine.eval()
    acc = torch.zeros(4, dtype=torch.float64, device=device)  # images, top-1 hits, top-5 hits, loss sum
    for x, y in loader:
        x, y = to_device(x, y, device, cfg.train.channels_last, precision.inputs)
        with precision.forward(device):
            out = engine(x)
        out = out.float()
        acc[0] += len(y)
        acc[1:3] += topk_hits(out.mean(0), y)
        acc[3] += loss_fn(cfg, out, y).double() * len(y)
    n, c1, c5, loss_sum = dist.all_reduce(acc, "sum").tolist()
    engine.train()
    return {"val_top1": c1 / max(n, 1), "val_top5": c5 / max(n, 1), "val_loss": loss_sum / max(n, 1),
            "val_samples": n}


def _report(callbacks: list, state: LoopState, rows: list[dict]) -> None:
    if rows:
        for cb in callbacks:
            if hasattr(cb, "on_log"):
                cb.on_log(state, rows)


def _sync(recorder: StepMetrics, callbacks: list, state: LoopState, world_size: int, accumulation: int) -> None:
    """Read the pending steps (one host transfer), apply the non-finite policy and report them."""
    try:
        rows = recorder.flush(state, world_size, accumulation)
    except NonFiniteLoss as e:
        _report(callbacks, state, e.rows)
        raise
    _report(callbacks, state, rows)


def train(engine, loaders, cfg: Config, state: LoopState, callbacks: list, stops, device: str,
          precision: Precision, world_size: int, accumulation: int, watch: StallWatch | None = None,
          ) -> LoopState:
    """Run epochs from ``state`` until train.epochs or train.max_steps; callbacks see every step and epoch.
    ``watch`` hears of every finished step and is paused around evaluation and the callbacks (checkpoints)."""
    watch = watch or StallWatch(0)  # off
    train_loader, val_loader = loaders
    engine.train()
    t = cfg.train
    max_steps = t.max_steps or math.inf
    recorder = StepMetrics(device, getattr(engine, "step_skip", None), t.nan_policy, t.nan_skip_limit)

    def sync_due(step: int) -> bool:
        return (step % t.log_every_steps == 0 or step >= max_steps
                or bool(t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0))

    while state.epoch < t.epochs and state.step < max_steps:
        train_loader.set_epoch(state.epoch)
        train_loader.load_state_dict({"epoch": state.epoch, "batch": state.batch_in_epoch})
        recorder.restart_window()
        t_data = time.perf_counter()
        for x, y in train_loader:
            recorder.data_wait += time.perf_counter() - t_data
            x, y = to_device(x, y, device, t.channels_last, precision.inputs)
            target = y
            if cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0:
                x, target = mix_batch(x, y, cfg.model.num_classes, cfg.data.mixup_alpha, cfg.data.cutmix_alpha,
                                      t.seed, state.step, state.batch_in_epoch)
            if _FAULT_STALL and state.step + 1 == _FAULT_STALL[0] and state.batch_in_epoch % accumulation == 0:
                _injected_stall(_FAULT_STALL[1])
            with precision.forward(device):  # autocast for bf16-mixed; the loss and backward outside it
                out = engine(x)
            loss = loss_fn(cfg, out.float(), target)
            if state.step + 1 in _FAULT_NAN_STEPS:
                _FAULT_NAN_STEPS.discard(state.step + 1)  # once
                loss = loss * float("nan")
            recorder.micro_batch(loss)
            engine.backward(loss)
            boundary = engine.is_gradient_accumulation_boundary()
            if boundary:
                recorder.before_step()  # a non-finite loss on any rank: every rank skips this update
            engine.step()
            state.batch_in_epoch += 1
            state.samples += len(y) * world_size
            t_data = time.perf_counter()
            if not boundary:
                continue
            state.step += 1
            recorder.end_step(state.step, state.epoch, loss, out, y, engine.get_lr()[0])
            if sync_due(state.step):
                _sync(recorder, callbacks, state, world_size, accumulation)
            with watch.paused():  # a checkpoint takes as long as it takes
                for cb in callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(state, {"lr": engine.get_lr()[0]})
            watch.beat(state.step)
            code = stops.agreed()  # a host value on the CPU group: no wait for the device
            if code:
                _sync(recorder, callbacks, state, world_size, accumulation)
                raise StopTraining(code)
            if state.step >= max_steps:
                break
            t_data = time.perf_counter()
        else:
            _sync(recorder, callbacks, state, world_size, accumulation)
            state.epoch += 1
            state.batch_in_epoch = 0
            due = state.epoch % t.eval_every_epochs == 0 or state.epoch == t.epochs
            with watch.paused():
                metrics = evaluate(engine, val_loader, cfg, device, precision) if due else {}
                if metrics:
                    state.last_eval = {k: metrics[k] for k in ("val_top1", "val_top5", "val_loss")}
                for cb in callbacks:
                    cb.on_epoch_end(state, metrics)
            continue
        break  # max_steps reached mid-epoch
    return state
