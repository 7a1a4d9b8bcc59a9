"""Figures of runs (matplotlib, Agg backend, PNG): a run's own curves, and comparisons across runs.

Work in progress (H5): the signature below is the contract with `orchestrator sweep`.
"""

from __future__ import annotations

from pathlib import Path


def comparison_figures(tracking_uri: str, run_ids: list[str], out_dir: Path) -> list[Path]:
    """Write the comparison PNGs of ``run_ids`` into ``out_dir``; return their paths (in order)."""
    raise NotImplementedError("comparison_figures: being written (H5)")
