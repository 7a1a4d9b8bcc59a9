"""MLflow tracking: one run per training job, written by global rank 0 only, never blocking a step.

``create_tracker(cfg, run_dir, rank_info)`` is the only entry the training code needs::

    tracker = create_tracker(cfg, run_dir, rank_info).start()   # no-op object on ranks != 0
    tracker.log_params(cfg)                                      # dataclass or nested dict, flattened
    tracker.log_metrics({"train/loss": 0.7, "lr": 0.1}, step=global_step)
    tracker.log_artifact(run_dir / "config.yaml")
    tracker.log_checkpoint(run_dir / "best.pt", "checkpoints")
    tracker.finish("completed" | "failed" | "interrupted" | "requeued")

See ``tracker.py`` for buffering, outage handling and resuming into the same run.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

from .datasets import dataset_inputs
from .tags import default_tags
from .tracker import STATUS_MAP, MlflowTracker, NoopTracker
from .util import resolve_store

Tracker = NoopTracker  # the interface: MlflowTracker implements it on rank 0

__all__ = ["create_tracker", "default_tags", "resolve_store", "Tracker", "NoopTracker", "MlflowTracker",
           "STATUS_MAP"]


def _get(obj: Any, dotted: str, default: Any = None) -> Any:
    for part in dotted.split("."):
        if obj is None:
            return default
        obj = obj.get(part) if isinstance(obj, dict) else getattr(obj, part, None)
    return default if obj is None else obj


def default_run_name(cfg: Any, when: datetime | None = None) -> str:
    when = when or datetime.now()
    return f"{_get(cfg, 'model.name', 'run')}-T{_get(cfg, 'model.T', '?')}-{when:%Y%m%d-%H%M%S}"


def create_tracker(cfg: Any, run_dir: str | os.PathLike, rank_info: Any = None) -> NoopTracker:
    """The tracker for this process: an MlflowTracker on global rank 0, a NoopTracker everywhere else (and on
    every rank when ``tracking.backend`` is "none"). Cheap: nothing talks to MLflow before ``start()``."""
    rank = int(getattr(rank_info, "rank", 0) or 0) if rank_info is not None else 0
    backend = str(_get(cfg, "tracking.backend", "mlflow")).lower()
    if rank != 0 or backend == "none":
        return NoopTracker()
    uri, artifact_location = resolve_store(_get(cfg, "tracking.tracking_uri", ""),
                                           _get(cfg, "tracking.artifact_location", ""))
    experiment = _get(cfg, "tracking.experiment", "") or _get(cfg, "preset", "") or "Default"
    run_name = _get(cfg, "tracking.run_name", "")
    root = _get(cfg, "data.root", "")
    return MlflowTracker(
        tracking_uri=uri,
        artifact_location=artifact_location,
        experiment=experiment,
        run_dir=run_dir,
        buffer_size=int(_get(cfg, "tracking.buffer_size", 10000)),
        log_system_metrics=bool(_get(cfg, "tracking.log_system_metrics", True)),
        log_checkpoints=bool(_get(cfg, "tracking.log_checkpoints", True)),
        tags=default_tags(cfg, rank_info),
        parent_run_id=str(_get(cfg, "tracking.parent_run_id", "") or ""),
        register_model=str(_get(cfg, "tracking.register_model", "") or ""),
        datasets=dataset_inputs(root, str(_get(cfg, "data.name", "") or "")) if root else [],
        run_name=run_name or default_run_name(cfg),
        unique_name=not run_name,  # a default name gets -2, -3 ... when the experiment has it already
    )
