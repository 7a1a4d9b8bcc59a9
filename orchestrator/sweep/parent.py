"""The sweep's parent MLflow run: the axes as params, every run of the sweep its child, the comparison figures.

It is made by the project's own tracker (``create_tracker`` with the sweep directory as its run directory), so
the store, the experiment and their creation are exactly the training runs' own, and a relaunch reopens the same
parent through ``DIR/mlflow_run.json`` as a requeued run reopens its run.
"""

from __future__ import annotations

import copy
import logging
import sys
from pathlib import Path

from orchestrator.config import Config
from orchestrator.errors import UserError
from orchestrator.tracking import create_tracker
from orchestrator.tracking.tracker import NoopTracker

from .axes import Axis

log = logging.getLogger("orchestrator.sweep")

START_TIMEOUT_S = 120.0  # for the parent run to exist: the children need its id


def sweep_name(sweep_dir: str | Path) -> str:
    return Path(sweep_dir).resolve().name


def open_parent(base_cfg: Config, sweep_dir: str | Path, axes: list[Axis], fixed: list[str],
                n_runs: int) -> NoopTracker:
    """Create (or reopen) the parent run; returns its tracker (a NoopTracker when tracking.backend=none).
    The children need its id before they start, so an unreachable store is a clear error here."""
    cfg = copy.deepcopy(base_cfg)
    cfg.tracking.run_name = sweep_name(sweep_dir)
    cfg.tracking.log_system_metrics = False  # the children measure their machines; this process only waits
    tracker = create_tracker(cfg, sweep_dir, None)
    if not tracker.enabled:
        return tracker
    tracker.start()
    if tracker.run_id is None:  # a new sqlite store on a busy machine can take longer than start()'s wait
        tracker.flush(timeout=START_TIMEOUT_S)
    if tracker.run_id is None:
        tracker.finish("failed", timeout=1.0)
        raise UserError(f"cannot create the sweep's parent run at MLflow store {tracker.tracking_uri} (not reachable "
                        "or refused; see the warning above); start the store, set tracking.tracking_uri, or "
                        "tracking.backend=none to sweep without tracking")
    tracker.log_params({a.key: ",".join(a.values) for a in axes})
    tracker.log_params({"sweep.runs": n_runs, "sweep.overrides": " ".join(fixed) or "(none)"})
    tags = {"sweep.dir": str(Path(sweep_dir).resolve()), "sweep.role": "parent", "sweep.runs": str(n_runs),
            "sweep.axes": " ".join(a.key for a in axes)}
    for key, tag in (("model.name", "model"), ("model.T", "T")):  # the default tags state the base config's
        axis = next((a for a in axes if a.key == key), None)
        if axis is not None:
            tags[tag] = ",".join(axis.values)
    tracker.set_tags(tags)
    if not tracker.flush(timeout=30.0):
        log.warning("the parent run's params are still being sent (store slow); the sweep goes on")
    return tracker


def log_figures(tracker: NoopTracker, run_ids: list[str], out_dir: Path) -> list[Path]:
    """The comparison figures of the sweep's runs, written to ``out_dir`` and logged to the parent under
    ``figures/``. A figure problem is a warning, never the sweep's failure."""
    if not tracker.enabled or not run_ids:
        return []
    try:
        from orchestrator.tracking.figures import comparison_figures

        paths = comparison_figures(tracker.tracking_uri, run_ids, out_dir)
    except (ImportError, NotImplementedError) as e:
        print(f"sweep: comparison figures unavailable ({e})", file=sys.stderr)
        return []
    except Exception as e:  # noqa: BLE001 - a plotting or store problem must not fail a finished sweep
        print(f"sweep: comparison figures failed: {type(e).__name__}: {e}", file=sys.stderr)
        return []
    for p in paths:
        tracker.log_artifact(p, "figures")
    return [Path(p) for p in paths]


def outcome(statuses: list[str]) -> str:
    """The parent's end status from its runs': completed only when every run completed."""
    if all(s == "completed" for s in statuses):
        return "completed"
    if any(s == "interrupted" for s in statuses) and not any(s == "failed" for s in statuses):
        return "interrupted"
    return "failed"
