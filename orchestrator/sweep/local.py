"""A sweep on this machine: its runs one after another, each through `orchestrator launch`'s own path."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from launch import runlock
from orchestrator.errors import UserError
from orchestrator.tracking.tracker import NoopTracker

from . import state as st
from .finish import finalize

LOCK = ".sweep.lock"

# (run directory, overrides) -> exit code: `orchestrator launch`'s local path (cli.cmd_launch).
LaunchOne = Callable[[Path, list[str]], int]


def _busy_line(sweep_dir: Path, holder: str) -> str:
    return (f"another `orchestrator sweep` is running in {sweep_dir} ({holder}); wait for it, or stop it (Ctrl-C) "
            "and relaunch")


@contextmanager
def sweep_lock(sweep_dir: Path) -> Iterator[None]:
    """Held while a local sweep runs in DIR: a second sweep process there would train the same runs twice."""
    try:
        lock = runlock.acquire(sweep_dir, name=LOCK)
    except runlock.RunDirBusy as e:
        raise UserError(_busy_line(sweep_dir, e.holder)) from None
    with lock or nullcontext():
        yield


def check_not_running(sweep_dir: Path) -> None:
    """Refuse (UserError) while a local sweep process holds DIR's lock; writes nothing."""
    who = runlock.holder(sweep_dir, name=LOCK)
    if who is not None:
        raise UserError(_busy_line(sweep_dir, who))


def is_running_here(sweep_dir: Path) -> bool:
    """True while a local sweep process holds DIR's lock."""
    return runlock.holder(sweep_dir, name=LOCK) is not None


def child_overrides(run: st.RunState, parent_run_id: str | None) -> list[str]:
    """What the sweep adds to a run's own overrides: its name (it starts with the model's, so it reads as text),
    and its parent run (quoted: an id of digits and one 'e' would otherwise be read as a number)."""
    extra = [f"tracking.run_name={run.name}"]
    if parent_run_id:
        extra.append(f'tracking.parent_run_id="{parent_run_id}"')
    return run.overrides + extra


def _mtime(p: Path) -> int | None:
    try:
        return p.stat().st_mtime_ns
    except OSError:
        return None


def _terminate(signum, frame):  # SIGTERM between runs ends the sweep as Ctrl-C does (the parent run is ended)
    raise KeyboardInterrupt


def run_sweep(state: st.SweepState, parent: NoopTracker, launch_one: LaunchOne) -> int:
    """Train every run that has not completed, in order; a relaunch skips completed runs and resumes the others
    from their own checkpoints (and MLflow runs). Ctrl-C stops the run in progress with a checkpoint and ends
    the sweep. Returns the first failing run's exit code (130 when interrupted), else 0."""
    code = 0
    todo = [r for r in state.runs if r.status != "completed"]
    for r in state.runs:
        if r.status == "completed":
            print(f"sweep: {r.name}: completed before (val top-1 {r.val_top1}), skipped", file=sys.stderr)
    old = signal.signal(signal.SIGTERM, _terminate)
    current: st.RunState | None = None
    try:
        for k, r in enumerate(todo, 1):
            current = r
            summary = Path(r.run_dir) / "summary.json"
            before = _mtime(summary)
            resumed = " (resuming)" if (Path(r.run_dir) / "checkpoints").is_dir() else ""
            own = [o for o in r.overrides if o not in state.fixed]
            print(f"sweep: run {k}/{len(todo)} {r.name}{resumed}: {' '.join(own) or '(no axes)'}", file=sys.stderr)
            r.status, r.error = "running", ""
            st.save(state)
            try:
                rc = launch_one(Path(r.run_dir), child_overrides(r, state.mlflow_parent_run_id))
            except UserError as e:  # bad input met by this run (e.g. a corrupt record): recorded, the sweep goes on
                rc, r.error = 2, str(e)
                print(f"sweep: {r.name}: {e}", file=sys.stderr)
            st.refresh_from_runs(state)
            if _mtime(summary) == before:  # this attempt wrote no summary (it failed before training)
                r.status = "interrupted" if rc == 130 else "failed" if rc else r.status
            current = None
            st.save(state)
            if rc == 130:
                code = 130
                break
            code = code or rc
    except KeyboardInterrupt:
        if current is not None:
            current.status = "interrupted"
        code = 130
    finally:
        signal.signal(signal.SIGTERM, old)
        st.refresh_from_runs(state)
        if current is not None and current.status == "running":
            current.status = "interrupted"
        st.save(state)
        if state.all_ended():
            finalize(state, parent)
        else:
            parent.finish("interrupted" if code == 130 else "failed")
    return code
