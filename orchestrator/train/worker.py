"""The per-rank training entry (`orchestrator train`): one process per rank, locally or under srun.

It reads its rank from the environment (launch.env), joins the process group, builds data, model and DeepSpeed
engine, resumes from the run directory's latest complete checkpoint if there is one, trains, and (on the primary
rank) writes ``summary.json``. Exit codes: 0 completed, 1 failed, 2 bad input, 3 stopped for a requeue,
130 interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from launch.env import RankInfo, rank_info
from orchestrator.config import Config, load_config, to_dict, to_yaml
from orchestrator.errors import UserError, report_bad_input, reported_bad_input
from orchestrator.fsutil import atomic_write
from orchestrator.train import callbacks as cb
from orchestrator.train import dist
from orchestrator.train.checkpoint import CheckpointManager, sha256_file
from orchestrator.train.engine import (
    BatchPlan,
    batch_plan,
    build_engine,
    init_distributed,
    prepare_model,
    resolve_device,
    resolve_precision,
)
from orchestrator.train.loop import LoopState, NonFiniteLoss, StopTraining, evaluate, train
from orchestrator.train.precision import Precision
from orchestrator.train.signals import INTERRUPT, REQUEUE, StopRequests
from orchestrator.train.stall import StallWatch

log = logging.getLogger("orchestrator.train")

EXIT = {"completed": 0, "failed": 1, "requeued": 3, "interrupted": 130}


def setup_logging(info: RankInfo) -> None:
    """Primary rank logs progress; the others only warnings, each line tagged with its rank."""
    level = logging.INFO if info.is_primary else logging.WARNING
    fmt = f"%(asctime)s [rank {info.rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int, deterministic: bool, cudnn_benchmark: bool = False) -> None:
    """Seed every generator; deterministic algorithms, or cuDNN's autotuner (only without determinism)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic


def prepare_dataset(cfg: Config, check_files: bool = False) -> Path:
    """The dataset folder, building the bundled digits set on first use. Missing data, a class count that
    doesn't match model.num_classes, and (with check_files) a corrupt FFRecord header are user errors."""
    from orchestrator.data.dali import load_meta

    root = Path(cfg.data.root)
    if cfg.data.name == "digits":
        from orchestrator.data.digits import ensure_digits_dataset

        root = Path(ensure_digits_dataset(root))
    meta = load_meta(root)  # a missing folder or meta.json is a UserError naming data.root
    if int(meta["num_classes"]) != cfg.model.num_classes:
        raise UserError(f"dataset {root} has {meta['num_classes']} classes but model.num_classes="
                        f"{cfg.model.num_classes}; set model.num_classes={meta['num_classes']}")
    if check_files:
        verify_dataset(root, cfg.data.verify)
    return root


FULL_VERIFY_MAX_BYTES = 4 * 2**30  # data.verify=auto checks every CRC up to this size (seconds of reading)


def verify_dataset(root: Path, mode: str) -> None:
    """Headers of every FFRecord file and whether it is cut short, and every record's CRC under ``full``
    (``auto``: when small enough). Corruption is a UserError naming the file and the record."""
    from orchestrator.data.dali import corrupt_message
    from orchestrator.data.ffrecord import FFRecordError, FileReader

    readers = {}
    try:
        for split in ("train", "val"):
            try:
                readers[split] = FileReader(root / f"{split}.ffr", check_data=True)
            except (FFRecordError, FileNotFoundError, OSError) as e:
                raise UserError(f"dataset {root}: {str(e).splitlines()[0]}") from None
        cut = [m for r in readers.values() for m in r.truncated()]  # from the sizes alone: every mode
        if cut:
            more = f" (and {len(cut) - 1} more files)" if len(cut) > 1 else ""
            raise UserError(corrupt_message(f"{cut[0]}{more}", root))
        total = sum(os.path.getsize(f) for r in readers.values() for f in r.files)
        if mode == "full" or (mode == "auto" and total <= FULL_VERIFY_MAX_BYTES):
            if total > 2**28:
                print(f"launch: checking every record's CRC in {root} ({total / 2**30:.2f} GiB; data.verify="
                      f"{mode})", file=sys.stderr, flush=True)
            for r in readers.values():
                bad = r.validate()
                if bad:
                    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                    raise UserError(corrupt_message(f"{bad[0]}{more}", root))
    finally:
        for r in readers.values():
            r.close()


def model_kwargs(cfg: Config) -> dict:
    m = cfg.model
    return dict(num_classes=m.num_classes, T=m.T, width=m.width, in_channels=m.in_channels,
                input_size=m.input_size, connection=m.connection, da=asdict(m.da), neuron=asdict(m.neuron),
                zero_init_residual=m.zero_init_residual, checkpointing=m.checkpointing,
                spike_storage=m.spike_storage, memory_budget_gb=m.memory_budget_gb,
                fuse_bn_neuron=m.fuse_bn_neuron, fuse_da=m.fuse_da)


def build_model(cfg: Config) -> torch.nn.Module:
    from models import create_model

    try:
        return create_model(cfg.model.name, **model_kwargs(cfg))
    except (ValueError, KeyError) as e:
        raise UserError(f"model.name={cfg.model.name}: {str(e).splitlines()[0]}") from None


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"run directory {run_dir} is not writable ({e.strerror}); pass --run-dir to a writable folder") from None


def _previous_summary(run_dir: Path) -> dict:
    p = run_dir / "summary.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except json.JSONDecodeError:
        return {}


def write_summary(run_dir: Path, summary: dict) -> None:
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True))


@dataclass
class Job:
    """What one rank builds before training (setup) and reports on afterwards (finish)."""

    cfg: Config
    info: RankInfo
    run_path: Path
    stops: StopRequests
    device: str
    precision: str
    plan: BatchPlan
    loaders: tuple  # (train, val)
    steps_per_epoch: int
    engine: Any
    ckpt: CheckpointManager
    t_start: float
    ema: Any = None
    state: LoopState = field(default_factory=LoopState)
    resumed: bool = False
    previous: dict = field(default_factory=dict)  # the run's summary.json from an earlier start
    tracker: Any = None
    callbacks: list = field(default_factory=list)
    checkpoints: Any = None  # the Checkpoints callback (a stop saves through it)
    forward_dtype: dict = field(default_factory=dict)  # {"dtype": the first training forward's output dtype}

    @property
    def precision_mode(self) -> Precision:
        return Precision(self.precision)

    @property
    def total_steps(self) -> int:
        total = self.steps_per_epoch * self.cfg.train.epochs
        return min(total, self.cfg.train.max_steps) if self.cfg.train.max_steps else total


@dataclass
class Outcome:
    status: str = "completed"
    error: str = ""
    bad_input: bool = False
    images_per_sec: float = 0.0


def run(config: str | None, run_dir: str, overrides: list[str], stops: StopRequests | None = None) -> int:
    """Train on this rank; returns the process exit code. Whatever setup or finish raises, the rank leaves the
    process group first: exiting with it still joined lets gloo's worker threads outlive the interpreter's
    teardown, which can abort the process (SIGABRT, "terminate called without an active exception"), so a rank
    that met bad input would exit -6 instead of 2, and the launcher would report a crash instead of the line."""
    try:
        job = setup(config, run_dir, overrides, stops or StopRequests())
        try:
            outcome = fit(job)
            return finish(job, outcome)
        except Exception as e:  # (a save at a stop, the final evaluation, the weights' export)
            _record_failure(job, e)
            raise
    finally:
        dist.shutdown(sync=False)  # (a no-op after finish's own; no barrier: a peer may be stuck elsewhere)


def _record_failure(job: Job, exc: Exception) -> None:
    """An exception out of fit or finish: summary.json says failed, with the error (not the previous start's
    status), and the MLflow run ends FAILED instead of staying RUNNING. Best effort: the exception is the report."""
    try:
        if job.info.is_primary:
            write_summary(job.run_path, {**job.previous, "status": "failed", "error": f"{type(exc).__name__}: {exc}",
                                         "steps": job.state.step, "epochs": job.state.epoch,
                                         "mlflow_run_id": getattr(job.tracker, "run_id", None)})  # fmt: skip
    except Exception as e:  # (the disk that failed the save may fail this too)
        log.error("summary.json not written: %s", e)
    try:
        job.tracker.finish("failed")
    except Exception as e:
        log.error("MLflow run not ended: %s", e)


def setup(config: str | None, run_dir: str, overrides: list[str], stops: StopRequests) -> Job:
    """Config, process group, data, model and DeepSpeed engine, the resumed state, tracking and callbacks."""
    t_start = time.time()
    cfg = load_config(config, overrides)
    info = rank_info()
    setup_logging(info)
    run_path = Path(run_dir).resolve()
    _check_writable(run_path)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    plan = batch_plan(cfg, info.world_size)
    _join(cfg, info, device)
    loaders = _loaders(cfg, info, plan, device)
    steps_per_epoch = max(1, len(loaders[0]) // plan.accumulation)
    model = prepare_model(cfg, build_model(cfg), device)
    engine = build_engine(cfg, model, plan, steps_per_epoch, precision)
    job = Job(cfg, info, run_path, stops, device, precision, plan, loaders, steps_per_epoch, engine,
              CheckpointManager(run_path, info.rank, cfg.train.keep_top_k), t_start,
              forward_dtype=_watch_forward_dtype(engine.module))
    _resume(job)
    _start_tracking(job)
    job.callbacks = _callbacks(job)
    return job


def fit(job: Job) -> Outcome:
    """Train from the resumed state; a stop request checkpoints. Every failure becomes the outcome's status."""
    out = Outcome()
    start_samples, t_train = job.state.samples, time.perf_counter()
    try:
        with StallWatch(job.cfg.train.stall_report_s) as watch:  # steps only: ends with them
            job.state = train(job.engine, job.loaders, job.cfg, job.state, job.callbacks, job.stops, job.device,
                              job.precision_mode, job.info.world_size, job.plan.accumulation, watch)
    except StopTraining as stop:
        out.status = "requeued" if stop.code == REQUEUE else "interrupted"
        log.warning("stop requested (%s): checkpointing at step %d", ", ".join(job.stops.received) or "peer",
                    job.state.step)
        job.checkpoints.save(job.state)
    except NonFiniteLoss as e:
        out.status, out.error = "failed", str(e)
        log.error("%s", e)
    except UserError as e:  # bad input met mid-run (a corrupt record): exit 2, checkpoints kept, resumable
        out.status, out.error, out.bad_input = "failed", str(e), True
        report_bad_input(job.run_path, str(e))  # whichever rank met it
        log.error("bad input: %s (the last checkpoint, %s, is kept; fix the data and launch again to resume)",
                  e, job.ckpt.latest_tag())
    except Exception as e:  # the cause goes to the log and the summary; the exit code says failed
        out.status, out.error = "failed", f"{type(e).__name__}: {e}"
        log.error("training failed: %s\n%s", out.error, traceback.format_exc())
    out.images_per_sec = (job.state.samples - start_samples) / max(time.perf_counter() - t_train, 1e-9)
    if job.state.step and out.status == "completed" and job.state.batch_in_epoch != 0:
        job.checkpoints.save(job.state)  # max_steps ended mid-epoch: keep that position too
    if out.status == "failed" and not out.bad_input and (reported := reported_bad_input(job.run_path)):
        out.error = reported  # another rank met bad input, which ended this one
    return out


def finish(job: Job, out: Outcome) -> int:
    """The final evaluation, weights, summary.json and tracker run; leave the process group; the exit code."""
    cfg, state, tracker = job.cfg, job.state, job.tracker
    # checkpointing=auto resolves to a concrete policy (from the memory model) on the first training forward
    tracker.set_tags({"checkpointing.resolved": str(getattr(job.engine.module, "checkpointing_resolved",
                                                            cfg.model.checkpointing))})
    final_metrics = {}
    if out.status == "completed":
        final_metrics = _final_eval(job.engine, job.loaders[1], cfg, job.device, job.precision_mode, state)
        tracker.log_metrics(final_metrics, step=state.step)
    if job.info.is_primary:
        _write_outputs(job, out, final_metrics)
    tracker.finish(out.status)
    dist.shutdown(sync=out.status != "failed")
    return 2 if out.bad_input else EXIT[out.status]


def _watch_forward_dtype(module: torch.nn.Module) -> dict:
    """A dict that the module's first forward fills with its output's dtype (then the hook is removed): what
    train.precision really gave, for summary.json (DeepSpeed once turned bf16-mixed's autocast off on GPUs)."""
    seen: dict = {}

    def note(mod, args, out) -> None:
        seen["dtype"] = str(getattr(out, "dtype", type(out).__name__))
        handle.remove()

    handle = module.register_forward_hook(note)
    return seen


def _join(cfg: Config, info: RankInfo, device: str) -> None:
    """Seeds, CPU threads and the process group."""
    seed_everything(cfg.train.seed, cfg.train.deterministic, cfg.train.cudnn_benchmark)
    if device == "cpu":
        # Ranks sharing a host split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    # Rendezvous waits for ranks that may start minutes apart on a loaded node; a dead peer is caught sooner by
    # the launcher (local) or srun --kill-on-bad-exit (Slurm), not by this timeout.
    init_distributed(info, device, max(300, cfg.launch.rank_timeout_s))


def _loaders(cfg: Config, info: RankInfo, plan: BatchPlan, device: str) -> tuple:
    from orchestrator.data.dali import build_loader

    cfg.data.root = str(prepare_dataset(cfg))
    return tuple(build_loader(cfg.data, split, info.rank, info.world_size, plan.micro_batch, cfg.train.seed, device,
                              expect_classes=cfg.model.num_classes, accumulation=plan.accumulation)
                 for split in ("train", "val"))  # fmt: skip


def _resume(job: Job) -> None:
    """The EMA shadow (tracked by the checkpoints) and the loop state of the latest complete checkpoint, with a
    mid-epoch position moved to this run's layout of ranks and micro-batches."""
    cfg, info, ckpt = job.cfg, job.info, job.ckpt
    if cfg.train.ema_decay > 0:
        from orchestrator.train.ema import EMA

        job.ema = EMA(job.engine.module, cfg.train.ema_decay, job.loaders[1], cfg, job.device)
        ckpt.track("ema", job.ema)  # the shadow is saved and restored with every checkpoint
    saved_world = ckpt.saved_world_size()
    if saved_world not in (None, info.world_size) and cfg.deepspeed.zero_stage > 0:
        raise UserError(f"{ckpt.dir / str(ckpt.latest_tag())} was written by {saved_world} ranks with ZeRO stage "
                        f"{cfg.deepspeed.zero_stage} (optimizer state split per rank); resume it with {saved_world} "
                        f"ranks, or start a new --run-dir")
    resumed = ckpt.load(job.engine)
    job.engine.step_skip.prepare()  # options and buffers the step skip relies on, whatever the checkpoint held
    state = LoopState(**resumed) if resumed else LoopState()
    from orchestrator.data.sampling import full_layout, translate_position

    layout = (info.world_size, job.plan.micro_batch, job.plan.accumulation)
    was = full_layout(state.layout) if state.layout else None
    if resumed and was and was != layout and state.batch_in_epoch:
        try:  # the same samples, step for step, counted in the new layout's batches
            moved = translate_position(job.loaders[0].num_samples, was, layout, state.batch_in_epoch)
        except ValueError as e:
            raise UserError(f"cannot resume mid-epoch with a new layout: {e}") from None
        log.info("resuming with %d ranks x micro-batch %d (was %d x %d): epoch position %d -> %d batches",
                 *layout[:2], *was[:2], state.batch_in_epoch, moved)
        state.batch_in_epoch = moved
    state.layout = list(layout)
    job.state, job.resumed = state, bool(resumed)
    job.previous = _previous_summary(job.run_path)


def _start_tracking(job: Job) -> None:
    from orchestrator.tracking import create_tracker

    cfg, info, plan, state = job.cfg, job.info, job.plan, job.state
    job.tracker = tracker = create_tracker(cfg, job.run_path, info)
    tracker.start()
    if info.is_primary:
        # whole or not at all: a resume reads it back, and a file cut short by a full disk read back as the
        # defaults, which a resume refuses as another model
        atomic_write(job.run_path / "config.yaml", to_yaml(cfg))
    tracker.log_params(to_dict(cfg))
    tracker.log_params({"derived.world_size": info.world_size, "derived.micro_batch": plan.micro_batch,
                        "derived.accumulation": plan.accumulation, "derived.steps_per_epoch": job.steps_per_epoch,
                        "derived.precision": job.precision, "derived.device": job.device})
    tracker.log_artifact(str(job.run_path / "config.yaml"))  # a no-op on every rank but the primary
    if job.resumed:
        log.info("resumed from %s at step %d (epoch %d, batch %d); restart %d", job.ckpt.latest_tag(), state.step,
                 state.epoch, state.batch_in_epoch, _restarts(job))
    log.info("run %s: %s T=%d, world size %d, micro-batch %d x accumulation %d, %d steps/epoch, %s %s",
             job.run_path, cfg.model.name, cfg.model.T, info.world_size, plan.micro_batch, plan.accumulation,
             job.steps_per_epoch, job.device, job.precision)


def _callbacks(job: Job) -> list:
    cfg, tracker = job.cfg, job.tracker
    sample = next(iter(job.loaders[1]))[0][:16].to(job.device, job.precision_mode.inputs)
    job.checkpoints = cb.Checkpoints(job.ckpt, job.engine, cfg.train.checkpoint_every_steps, job.info.is_primary,
                                     tracker)
    callbacks = [cb.Progress(job.total_steps, job.steps_per_epoch, cfg.train.epochs, cfg.train.log_every_steps,
                             job.device),
                 cb.TrackerMetrics(tracker, job.device), cb.Telemetry(job.engine.module, sample, tracker),
                 job.checkpoints]
    if job.ema is not None:  # first, so the epoch's ema_val_* reach the tracker with the rest
        callbacks.insert(0, job.ema)
    return callbacks


def _restarts(job: Job) -> int:
    return int(job.previous.get("restarts", 0)) + (1 if job.resumed else 0)


def _write_outputs(job: Job, out: Outcome, final_metrics: dict) -> None:
    """final.pt (and final_ema.pt), summary.json, the REQUEUE marker and their artifacts (primary rank)."""
    cfg, state, tracker, ckpt = job.cfg, job.state, job.tracker, job.ckpt
    summary = dict(job.previous)
    summary.pop("loss_history", None)  # every step's loss, as summaries before loss_digest kept it
    weights = ckpt.export_weights(job.engine.module, "final.pt", {"step": state.step, "epoch": state.epoch})
    if job.ema is not None:
        ema_path = ckpt.export_weights(job.ema.shadow, "final_ema.pt", {"step": state.step,
                                                                        "ema_decay": job.ema.decay})
        summary["ema_weights_sha256"] = sha256_file(ema_path)
    summary.update({
        "status": out.status, "error": out.error, "epochs": state.epoch, "steps": state.step,
        "forward_dtype": job.forward_dtype.get("dtype"),
        **state.loss_summary(),  # bounded: the whole loss curve is in MLflow
        "world_size": job.info.world_size, "images_per_sec": out.images_per_sec,
        "mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.tracking_uri,
        "checkpoint_dir": str(ckpt.dir), "latest_checkpoint": ckpt.latest_tag(), "restarts": _restarts(job),
        "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
        "weights_sha256": sha256_file(weights), "best_val_top1": max(state.best_val_top1, 0.0),
        "nan_skipped": state.nan_skipped, "model": cfg.model.name, "preset": cfg.preset,
        "wall_s": round(time.time() - job.t_start, 2), **final_metrics,
    })
    summary.setdefault("val_top1", None)
    summary.setdefault("val_top5", None)
    write_summary(job.run_path, summary)
    if out.status == "requeued":
        atomic_write(job.run_path / "REQUEUE", str(state.step))
    tracker.log_artifact(str(job.run_path / "summary.json"))
    if out.status == "completed":
        tracker.log_artifact(str(weights), "weights")
    log.info("%s: %d steps, val top1 %s, summary %s", out.status, state.step, summary.get("val_top1"),
             job.run_path / "summary.json")


def _final_eval(engine, val_loader, cfg, device, precision: Precision, state: LoopState) -> dict:
    """The last validation figures: reuse the epoch-end evaluation when the run ended on an epoch boundary."""
    if state.batch_in_epoch == 0 and state.last_eval:
        return dict(state.last_eval)
    m = evaluate(engine, val_loader, cfg, device, precision)
    return {"val_top1": m["val_top1"], "val_top5": m["val_top5"], "val_loss": m["val_loss"]}


__all__ = ["run", "INTERRUPT", "REQUEUE"]
