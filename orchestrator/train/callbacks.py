"""Loop callbacks: console progress, tracker metrics, checkpoints, telemetry. Progress and tracker metrics read
each step's figures at the loop's sync points (``on_log``); checkpoints and telemetry act on the step itself."""

from __future__ import annotations

import logging
import resource
import time

import torch

from orchestrator.train.checkpoint import CheckpointManager
from orchestrator.train.loop import LoopState

log = logging.getLogger("orchestrator.train")


def peak_memory_mb(device: str) -> float:
    """CUDA: the allocator's peak; CPU: this process's peak resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Progress:
    """Progress lines every ``every`` steps and at each epoch end, with an ETA (primary rank prints)."""

    def __init__(self, total_steps: int, steps_per_epoch: int, epochs: int, every: int, device: str):
        self.total, self.spe, self.epochs, self.every, self.device = total_steps, steps_per_epoch, epochs, every, device
        self.t0 = time.perf_counter()
        self.start_step: int | None = None
        self.window: list[float] = []

    def on_log(self, state: LoopState, rows: list[dict]) -> None:
        for m in rows:
            self._step(m)

    def _step(self, m: dict) -> None:
        step = m["step"]
        if self.start_step is None:
            self.start_step = step - 1
        if "loss" in m:  # a skipped (non-finite) step has none
            self.window.append(m["loss"])
        if step % self.every and step != self.total:
            return
        done = step - self.start_step
        rate = done / max(time.perf_counter() - self.t0, 1e-9)
        eta = (self.total - step) / max(rate, 1e-9)
        loss = sum(self.window) / len(self.window) if self.window else float("nan")
        log.info("epoch %d/%d step %d/%d loss %.4f lr %.2e top1 %.3f %.0f img/s data-wait %.0f%% eta %dm%02ds",
                 m["epoch"] + 1, self.epochs, step, self.total, loss, m["lr"], m.get("train_top1", float("nan")),
                 m["images_per_sec"], 100 * m["data_wait_frac"], eta // 60, eta % 60)
        self.window.clear()

    def on_epoch_end(self, state: LoopState, m: dict) -> None:
        if m:
            log.info("epoch %d/%d done: val top1 %.4f top5 %.4f loss %.4f", state.epoch, self.epochs,
                     m["val_top1"], m["val_top5"], m["val_loss"])


class TrackerMetrics:
    """Step and epoch metrics to the tracker (a no-op tracker on non-primary ranks)."""

    def __init__(self, tracker, device: str):
        self.tracker, self.device = tracker, device

    def on_log(self, state: LoopState, rows: list[dict]) -> None:
        peak = peak_memory_mb(self.device)
        for m in rows:
            self.tracker.log_metrics({**{k: v for k, v in m.items() if k != "step"}, "peak_memory_mb": peak},
                                     step=m["step"])

    def on_epoch_end(self, state: LoopState, m: dict) -> None:
        if m:
            self.tracker.log_metrics({k: v for k, v in m.items() if isinstance(v, (int, float))}, step=state.step)


class Telemetry:
    """Firing rates per stage, SOPs and energy estimate from one small forward pass each epoch."""

    def __init__(self, module: torch.nn.Module, sample: torch.Tensor, tracker):
        self.module, self.sample, self.tracker = module, sample, tracker
        self.last: dict = {}

    def on_step_end(self, state: LoopState, m: dict) -> None:
        pass

    def on_epoch_end(self, state: LoopState, m: dict) -> None:
        try:
            from models.telemetry import measure
        except ImportError:  # telemetry arrives with the models package
            return
        was_training = self.module.training
        self.module.eval()
        with torch.no_grad():
            self.last = {f"telemetry/{k}": float(v) for k, v in measure(self.module, self.sample).items()
                         if isinstance(v, (int, float))}
        self.module.train(was_training)
        self.tracker.log_metrics(self.last, step=state.step)


class Checkpoints:
    """Checkpoint at each epoch end (scored by val top-1 for top-k) and every N steps; best weights exported."""

    def __init__(self, manager: CheckpointManager, engine, every_steps: int, is_primary: bool, tracker):
        self.manager, self.engine, self.every, self.primary, self.tracker = manager, engine, every_steps, is_primary, tracker

    def save(self, state: LoopState, val_top1: float | None = None) -> str:
        return self.manager.save(self.engine, state.step, state.to_dict(), val_top1)

    def on_step_end(self, state: LoopState, m: dict) -> None:
        if self.every and state.step % self.every == 0:
            self.save(state)

    def on_epoch_end(self, state: LoopState, m: dict) -> None:
        top1 = m.get("val_top1")
        if top1 is not None and top1 > state.best_val_top1:
            state.best_val_top1 = top1
            if self.primary:
                path = self.manager.export_weights(self.engine.module, "best.pt",
                                                   {"step": state.step, "epoch": state.epoch, "val_top1": top1})
                self.tracker.log_artifact(str(path), "weights")
                self.tracker.log_model(str(path), {"val_top1": top1}, step=state.step)  # the run's logged model
        self.save(state, top1)
