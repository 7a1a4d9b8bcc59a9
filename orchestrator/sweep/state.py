"""DIR/sweep.json: what the sweep is (config, fixed overrides, axes) and where each run stands.

Written atomically (a reader sees the old file or the new one). A run's own files are the truth for its
outcome: ``refresh_from_runs`` reads each run directory's ``summary.json`` (status, val top-1) and
``mlflow_run.json`` (the MLflow run id, known as soon as the run has started).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

from orchestrator.errors import UserError
from orchestrator.fsutil import atomic_write

FILE = "sweep.json"
VERSION = 1
# Statuses a run does not leave by itself; "completed" is the only one a relaunch skips.
FINAL = {"completed", "failed", "interrupted", "cancelled", "timeout", "node_fail", "out_of_memory", "boot_fail",
         "deadline", "preempted"}


@dataclass
class RunState:
    index: int
    name: str
    run_dir: str
    overrides: list[str]
    status: str = "pending"
    mlflow_run_id: str | None = None
    val_top1: float | None = None
    steps: int | None = None
    log: str | None = None
    error: str = ""


@dataclass
class SweepState:
    dir: str
    config: str
    fixed: list[str]
    axes: list[list]  # [[key, [value, ...]], ...] in command-line order
    runs: list[RunState]
    mlflow_parent_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    experiment: str | None = None
    mode: str = "local"  # local | slurm (the latest launch)
    slurm_array_job_id: str | None = None
    slurm_array_job_ids: list[str] = field(default_factory=list)  # every array submitted, oldest first
    slurm_finish_job_id: str | None = None
    finalized: bool = False  # figures logged and the parent run ended for the current set of outcomes
    figures: list[str] = field(default_factory=list)
    created: str = ""
    updated: str = ""
    version: int = VERSION

    def run(self, name: str) -> RunState:
        return next(r for r in self.runs if r.name == name)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.runs:
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def all_ended(self) -> bool:
        return all(r.status in FINAL for r in self.runs)


def path_of(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir) / FILE


def save(state: SweepState) -> None:
    now = datetime.now().isoformat(timespec="seconds")
    state.created = state.created or now
    state.updated = now
    Path(state.dir).mkdir(parents=True, exist_ok=True)
    atomic_write(path_of(state.dir), json.dumps(asdict(state), indent=1) + "\n")


def load(sweep_dir: str | Path) -> SweepState:
    p = path_of(sweep_dir)
    if not p.is_file():
        raise UserError(f"{sweep_dir} is not a sweep directory (no {FILE}); start one with orchestrator sweep "
                        f"--run-dir {sweep_dir} key=a,b ...")
    try:
        raw = json.loads(p.read_text())
        raw["runs"] = [RunState(**r) for r in raw["runs"]]
        return SweepState(**raw)
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise UserError(f"{p} is not a sweep file this version reads ({e}); start the sweep in a new --run-dir") from None


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def refresh_from_runs(state: SweepState) -> None:
    """Outcome, val top-1 and MLflow run id of each run from its directory (a summary is written when a run
    ends: completed, failed, interrupted, or stopped for a requeue)."""
    for r in state.runs:
        run_dir = Path(r.run_dir)
        summary = _read_json(run_dir / "summary.json")
        mlflow_run = _read_json(run_dir / "mlflow_run.json")
        r.mlflow_run_id = summary.get("mlflow_run_id") or mlflow_run.get("run_id") or r.mlflow_run_id
        if summary:
            r.status = str(summary.get("status") or r.status)
            r.val_top1 = summary.get("val_top1")
            r.steps = summary.get("steps")
            r.error = str(summary.get("error") or "")


def check_same_sweep(state: SweepState, config: str, fixed: list[str], axes: list[list]) -> None:
    """A relaunch into DIR must be the same sweep: same config, overrides and axes (else it is a clear error)."""
    have = {"config": state.config, "overrides": state.fixed, "axes": state.axes}
    want = {"config": config, "overrides": fixed, "axes": axes}
    for what in have:
        # The fixed overrides may come in any order (no key is given twice); the axes' order makes the runs'.
        same = sorted(have[what]) == sorted(want[what]) if what == "overrides" else have[what] == want[what]
        if not same:
            fmt = (lambda a: " ".join(f"{k}={','.join(v)}" for k, v in a) or "(none)") if what == "axes" else \
                (lambda v: " ".join(v) or "(none)") if what == "overrides" else str
            verb = "is" if what == "config" else "are"
            raise UserError(f"{state.dir} holds another sweep: its {what} {verb} {fmt(have[what])}, not "
                            f"{fmt(want[what])}; relaunch it with the same {what}, or use a new --run-dir")
