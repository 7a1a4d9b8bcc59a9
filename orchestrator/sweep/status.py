"""`orchestrator sweep status DIR`: sweep.json refreshed from the runs' summaries and Slurm, as a table."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from orchestrator.errors import UserError

from . import state as st
from .finish import finalize_later
from .local import is_running_here

_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "SIGNALING", "STAGE_OUT", "RESIZING"}


def refresh(state: st.SweepState) -> None:
    """Each run's status from its summary.json, then (on Slurm) from its array task's state, which says more
    while the task is queued, running or requeued, or when it ended without a summary."""
    st.refresh_from_runs(state)
    if state.mode == "slurm" and state.slurm_array_job_id and shutil.which("scontrol"):
        from launch import slurm as sl

        tasks = sl.array_states(state.slurm_array_job_id)
        for r in state.runs:
            s = tasks.get(r.index)
            if s is None:
                continue
            if s in _RUNNING:
                if not (s == "COMPLETING" and r.status in st.FINAL):
                    r.status = "running"
            elif s in sl.ACTIVE_STATES:
                r.status = "requeued" if s.startswith("REQUEUE") else "pending"
            elif r.status not in st.FINAL:  # ended without a summary of this attempt
                r.status = "failed" if s == "COMPLETED" else s.lower()
    elif state.mode == "local" and not is_running_here(Path(state.dir)):
        for r in state.runs:
            if r.status == "running":  # the sweep process is gone (killed): the run did not end by itself
                r.status = "interrupted"


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def table(state: st.SweepState) -> str:
    """The sweep as text: one header line, then one row per run."""
    counts = ", ".join(f"{k} {v}" for k, v in sorted(state.counts().items()))
    head = [f"sweep {state.dir}: {len(state.runs)} runs ({counts})",
            f"mlflow parent run {state.mlflow_parent_run_id or '-'} at {state.mlflow_tracking_uri or '-'}"
            f" (experiment {state.experiment or '-'})"]
    if state.slurm_array_job_id:
        head.append(f"slurm job array {state.slurm_array_job_id}" +
                    (f" (earlier: {', '.join(state.slurm_array_job_ids[:-1])})" if len(state.slurm_array_job_ids) > 1
                     else ""))
    if state.figures:
        head.append(f"figures {', '.join(Path(f).name for f in state.figures)} (in {Path(state.dir) / 'figures'})")
    cols = ["name", "status", "val_top1", "steps", "mlflow_run_id", "overrides"]
    rows = [[r.name, r.status, _fmt(r.val_top1), _fmt(r.steps), r.mlflow_run_id or "-",
             " ".join(o for o in r.overrides if o not in state.fixed)] for r in state.runs]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(head + [""] + lines)


def show(sweep_dir: str | Path) -> str:
    """Refresh DIR/sweep.json (unless a local sweep process is writing it), finalize a sweep whose runs have all
    ended (figures on the parent run, its end status), and return the table."""
    state = st.load(sweep_dir)
    refresh(state)
    if not is_running_here(Path(state.dir)):
        st.save(state)
        if state.all_ended() and not state.finalized and state.mlflow_parent_run_id:
            try:
                finalize_later(state)
            except UserError as e:  # the store is down: the table still comes; a later `status` finalizes
                print(f"sweep: the parent run was not finalized: {e}", file=sys.stderr)
    return table(state)
