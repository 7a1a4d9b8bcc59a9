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
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from launch.env import RankInfo, rank_info
from orchestrator.config import Config, load_config, to_dict, to_yaml
from orchestrator.errors import UserError, report_bad_input, reported_bad_input
from orchestrator.fsutil import atomic_write
from orchestrator.train import callbacks as cb
from orchestrator.train.checkpoint import CheckpointManager, sha256_file
from orchestrator.train.engine import (
    batch_plan,
    build_engine,
    init_distributed,
    resolve_device,
    resolve_precision,
)
from orchestrator.train.loop import LoopState, NonFiniteLoss, StopTraining, evaluate, train
from orchestrator.train.signals import INTERRUPT, REQUEUE, StopRequests

log = logging.getLogger("orchestrator.train")

EXIT = {"completed": 0, "failed": 1, "requeued": 3, "interrupted": 130}


def setup_logging(info: RankInfo) -> None:
    """Primary rank logs progress; the others only warnings, each line tagged with its rank."""
    level = logging.INFO if info.is_primary else logging.WARNING
    fmt = f"%(asctime)s [rank {info.rank}] %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", stream=sys.stderr, force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


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
                spike_storage=m.spike_storage, memory_budget_gb=m.memory_budget_gb)


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


def run(config: str | None, run_dir: str, overrides: list[str], stops: StopRequests | None = None) -> int:
    """Train on this rank; returns the process exit code."""
    t_start = time.time()
    stops = stops or StopRequests()
    cfg = load_config(config, overrides)
    info = rank_info()
    setup_logging(info)
    run_path = Path(run_dir).resolve()
    _check_writable(run_path)
    device = resolve_device(cfg)
    precision = resolve_precision(cfg, device)
    plan = batch_plan(cfg, info.world_size)
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    if device == "cpu":
        # Ranks sharing a host split its cores instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // info.local_world_size))
    # Rendezvous waits for ranks that may start minutes apart on a loaded node; a dead peer is caught sooner by
    # the launcher (local) or srun --kill-on-bad-exit (Slurm), not by this timeout.
    init_distributed(info, device, max(300, cfg.launch.rank_timeout_s))

    from orchestrator.data.dali import build_loader
    from orchestrator.tracking import create_tracker

    root = prepare_dataset(cfg)
    cfg.data.root = str(root)
    train_loader = build_loader(cfg.data, "train", info.rank, info.world_size, plan.micro_batch, cfg.train.seed,
                                device, expect_classes=cfg.model.num_classes)
    val_loader = build_loader(cfg.data, "val", info.rank, info.world_size, plan.micro_batch, cfg.train.seed, device,
                              expect_classes=cfg.model.num_classes)
    steps_per_epoch = max(1, len(train_loader) // plan.accumulation)
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    model = build_model(cfg).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.compile:  # in place: state_dict keys (checkpoints, exported weights) stay unprefixed
        model.compile(backend=os.environ.get("ORCHESTRATOR_COMPILE_BACKEND", "inductor"))
    engine = build_engine(cfg, model, plan, steps_per_epoch, precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32

    ckpt = CheckpointManager(run_path, info.rank, cfg.train.keep_top_k)
    ema = None
    if cfg.train.ema_decay > 0:
        from orchestrator.train.ema import EMA

        ema = EMA(engine.module, cfg.train.ema_decay, val_loader, cfg, device)
        ckpt.track("ema", ema)  # the shadow is saved and restored with every checkpoint
    saved_world = ckpt.saved_world_size()
    if saved_world not in (None, info.world_size) and cfg.deepspeed.zero_stage > 0:
        raise UserError(f"{ckpt.dir / str(ckpt.latest_tag())} was written by {saved_world} ranks with ZeRO stage "
                        f"{cfg.deepspeed.zero_stage} (optimizer state split per rank); resume it with {saved_world} "
                        f"ranks, or start a new --run-dir")
    resumed = ckpt.load(engine)
    state = LoopState(**resumed) if resumed else LoopState()
    layout = [info.world_size, plan.micro_batch]
    if resumed and state.layout and state.layout != layout and state.batch_in_epoch:
        from orchestrator.data.sampling import translate_position

        try:  # the same samples, step for step, counted in the new layout's batches
            moved = translate_position(train_loader.num_samples, tuple(state.layout), tuple(layout),
                                       state.batch_in_epoch)
        except ValueError as e:
            raise UserError(f"cannot resume mid-epoch with a new layout: {e}") from None
        log.info("resuming with %d ranks x micro-batch %d (was %d x %d): epoch position %d -> %d batches",
                 *layout, *state.layout, state.batch_in_epoch, moved)
        state.batch_in_epoch = moved
    state.layout = layout
    previous = _previous_summary(run_path)
    restarts = int(previous.get("restarts", 0)) + (1 if resumed else 0)

    tracker = create_tracker(cfg, run_path, info)
    tracker.start()
    if info.is_primary:
        (run_path / "config.yaml").write_text(to_yaml(cfg))
    tracker.log_params(to_dict(cfg))
    tracker.log_params({"derived.world_size": info.world_size, "derived.micro_batch": plan.micro_batch,
                        "derived.accumulation": plan.accumulation, "derived.steps_per_epoch": steps_per_epoch,
                        "derived.precision": precision, "derived.device": device})
    tracker.log_artifact(str(run_path / "config.yaml"))  # a no-op on every rank but the primary
    if resumed:
        log.info("resumed from %s at step %d (epoch %d, batch %d); restart %d", ckpt.latest_tag(), state.step,
                 state.epoch, state.batch_in_epoch, restarts)
    log.info("run %s: %s T=%d, world size %d, micro-batch %d x accumulation %d, %d steps/epoch, %s %s",
             run_path, cfg.model.name, cfg.model.T, info.world_size, plan.micro_batch, plan.accumulation,
             steps_per_epoch, device, precision)

    sample = next(iter(val_loader))[0][:16].to(device, dtype)
    checkpoints = cb.Checkpoints(ckpt, engine, cfg.train.checkpoint_every_steps, info.is_primary, tracker)
    callbacks = [cb.Progress(total_steps, steps_per_epoch, cfg.train.epochs, cfg.train.log_every_steps, device),
                 cb.TrackerMetrics(tracker, device), cb.Telemetry(engine.module, sample, tracker), checkpoints]
    if ema is not None:  # first, so the epoch's ema_val_* reach the tracker with the rest
        callbacks.insert(0, ema)
    status, error, bad_input = "completed", "", False
    start_samples, t_train = state.samples, time.perf_counter()
    try:
        state = train(engine, (train_loader, val_loader), cfg, state, callbacks, stops, device, dtype,
                      info.world_size, plan.accumulation)
    except StopTraining as stop:
        status = "requeued" if stop.code == REQUEUE else "interrupted"
        log.warning("stop requested (%s): checkpointing at step %d", ", ".join(stops.received) or "peer", state.step)
        checkpoints.save(state)
    except NonFiniteLoss as e:
        status, error = "failed", str(e)
        log.error("%s", e)
    except UserError as e:  # bad input met mid-run (a corrupt record): exit 2, checkpoints kept, resumable
        status, error, bad_input = "failed", str(e), True
        report_bad_input(run_path, str(e))  # whichever rank met it
        log.error("bad input: %s (the last checkpoint, %s, is kept; fix the data and launch again to resume)",
                  e, ckpt.latest_tag())
    except Exception as e:  # the cause goes to the log and the summary; the exit code says failed
        status, error = "failed", f"{type(e).__name__}: {e}"
        log.error("training failed: %s\n%s", error, traceback.format_exc())
    train_s = time.perf_counter() - t_train
    # checkpointing=auto resolves to a concrete policy (from the memory model) on the first training forward
    tracker.set_tags({"checkpointing.resolved": str(getattr(engine.module, "checkpointing_resolved",
                                                            cfg.model.checkpointing))})
    if state.step and status == "completed" and not state.batch_in_epoch == 0:
        checkpoints.save(state)  # max_steps ended mid-epoch: keep that position too

    if status == "failed" and not bad_input and (reported := reported_bad_input(run_path)):
        error = reported  # another rank met bad input, which ended this one
    summary = dict(previous)
    summary.pop("loss_history", None)  # every step's loss, as summaries before loss_digest kept it
    final_metrics = {}
    if status == "completed":
        final_metrics = _final_eval(engine, val_loader, cfg, device, dtype, state)
        tracker.log_metrics(final_metrics, step=state.step)
    if info.is_primary:
        weights = ckpt.export_weights(engine.module, "final.pt", {"step": state.step, "epoch": state.epoch})
        if ema is not None:
            ema_path = ckpt.export_weights(ema.shadow, "final_ema.pt", {"step": state.step, "ema_decay": ema.decay})
            summary["ema_weights_sha256"] = sha256_file(ema_path)
        summary.update({
            "status": status, "error": error, "epochs": state.epoch, "steps": state.step,
            **state.loss_summary(),  # bounded: the whole loss curve is in MLflow
            "world_size": info.world_size, "images_per_sec": (state.samples - start_samples) / max(train_s, 1e-9),
            "mlflow_run_id": tracker.run_id, "mlflow_tracking_uri": tracker.tracking_uri,
            "checkpoint_dir": str(ckpt.dir), "latest_checkpoint": ckpt.latest_tag(), "restarts": restarts,
            "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0),
            "weights_sha256": sha256_file(weights), "best_val_top1": max(state.best_val_top1, 0.0),
            "nan_skipped": state.nan_skipped, "model": cfg.model.name, "preset": cfg.preset, "wall_s": round(time.time() - t_start, 2),
            **final_metrics,
        })
        summary.setdefault("val_top1", None)
        summary.setdefault("val_top5", None)
        write_summary(run_path, summary)
        if status == "requeued":
            (run_path / "REQUEUE").write_text(str(state.step))
        tracker.log_artifact(str(run_path / "summary.json"))
        if status in ("completed",):
            tracker.log_artifact(str(weights), "weights")
        log.info("%s: %d steps, val top1 %s, summary %s", status, state.step, summary.get("val_top1"),
                 run_path / "summary.json")
    tracker.finish(status)
    _shutdown(sync=status != "failed")
    return 2 if bad_input else EXIT[status]


def _final_eval(engine, val_loader, cfg, device, dtype, state: LoopState) -> dict:
    """The last validation figures: reuse the epoch-end evaluation when the run ended on an epoch boundary."""
    if state.batch_in_epoch == 0 and state.last_eval:
        return dict(state.last_eval)
    m = evaluate(engine, val_loader, cfg, device, dtype)
    return {"val_top1": m["val_top1"], "val_top5": m["val_top5"], "val_loss": m["val_loss"]}


def _shutdown(sync: bool = True) -> None:
    """Leave the process group; ``sync=False`` after a failure, when a peer may be blocked in another collective
    (a barrier could pair with it and hang until the timeout): exiting closes our sockets, which fails the peer's
    collective at once."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            if sync:
                dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already gone: nothing left to synchronise
            pass


__all__ = ["run", "INTERRUPT", "REQUEUE"]
