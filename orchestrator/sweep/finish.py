"""The end of a sweep: the comparison figures on the parent run, and the parent's end status."""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.config import load_config
from orchestrator.tracking.tracker import NoopTracker

from . import state as st
from .axes import Axis
from .parent import log_figures, open_parent, outcome


def finalize(state: st.SweepState, parent: NoopTracker) -> None:
    """Every run has ended: log the figures comparing them to the (open) parent run and end it."""
    ids = [r.mlflow_run_id for r in state.runs if r.mlflow_run_id]
    figures = log_figures(parent, ids, Path(state.dir) / "figures")
    state.figures = [str(p) for p in figures]
    end = outcome([r.status for r in state.runs])
    parent.finish(end)
    state.finalized = True
    st.save(state)
    if parent.enabled:
        print(f"sweep: parent run {parent.run_id} ended ({end}); {len(figures)} comparison figure(s) logged",
              file=sys.stderr)


def finalize_later(state: st.SweepState) -> None:
    """From `sweep status` (or the job that follows a Slurm array): reopen the parent run and finalize."""
    cfg = load_config(state.config, state.runs[0].overrides)
    axes = [Axis(k, tuple(v)) for k, v in state.axes]
    parent = open_parent(cfg, state.dir, axes, state.fixed, len(state.runs))
    finalize(state, parent)
