"""`orchestrator sweep`: expand and validate, then the runs locally (one after another) or as one Slurm job array.

Nothing is written before every run's config has been checked. A relaunch into the same DIR must be the same
sweep; it skips completed runs, resumes the others from their own run directories, and reuses the parent run.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import TextIO

from orchestrator.errors import UserError

from . import state as st
from .local import LaunchOne, check_not_running, run_sweep, sweep_lock
from .parent import open_parent
from .spec import SweepSpec, build


def default_dir(preset: str) -> Path:
    return Path("runs") / f"sweep-{preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def listing(spec: SweepSpec, sweep_dir: Path) -> str:
    """What --dry-run prints: the axes, then each run's name and overrides."""
    axes = " x ".join(f"{a.key} ({len(a.values)})" for a in spec.axes) or "no axes"
    lines = [f"sweep {sweep_dir}: {len(spec.runs)} runs = {axes}; config {spec.config_arg}"
             + (f", fixed: {' '.join(spec.fixed)}" if spec.fixed else "")]
    width = max(len(r.name) for r in spec.runs)
    lines += [f"  {r.name.ljust(width)}  {' '.join(o for o in r.overrides if o not in spec.fixed) or '-'}"
              for r in spec.runs]
    return "\n".join(lines)


def _new_state(spec: SweepSpec, sweep_dir: Path) -> st.SweepState:
    runs = [st.RunState(index=r.index, name=r.name, run_dir=str(sweep_dir / r.name), overrides=r.overrides)
            for r in spec.runs]
    return st.SweepState(dir=str(sweep_dir), config=spec.config_arg, fixed=spec.fixed,
                         axes=[[a.key, list(a.values)] for a in spec.axes], runs=runs)


def launch_sweep(config: str | None, run_dir: str | None, overrides: list[str], launch_one: LaunchOne,
                 nodes: int | None = None, gpus_per_node: int | None = None, partition: str | None = None,
                 time_limit: str | None = None, max_parallel: int | None = None, dry_run: bool = False,
                 out: TextIO = sys.stdout) -> int:
    """The `orchestrator sweep` command. ``launch_one(run_dir, overrides)`` trains one run locally (the CLI passes
    `orchestrator launch`'s own path). Returns the exit code."""
    slurm = nodes is not None
    if max_parallel is not None and max_parallel < 1:
        raise UserError(f"--max-parallel {max_parallel}: must be >= 1")
    if not slurm and max_parallel not in (None, 1):
        raise UserError(f"--max-parallel {max_parallel} needs --nodes (a Slurm job array); a local sweep runs its "
                        "runs one after another")
    from orchestrator import preflight as pf

    # The launcher's own flags first, as `orchestrator launch` checks them (a zero count would divide below).
    pf.raise_if((pf.check_slurm_flags if slurm else pf.check_local_flags)(nodes, gpus_per_node, partition,
                                                                            time_limit))

    def world(cfg) -> int:  # ranks of one run: the batch arithmetic must work out for each
        if slurm:
            return nodes * (gpus_per_node if gpus_per_node is not None else cfg.launch.gpus_per_node)
        from launch.local import local_rank_count

        return local_rank_count(cfg.launch.local_ranks, cfg.train.device)  # as launch: one rank per GPU

    def checks(cfg) -> list[str]:  # what `orchestrator launch` checks before it starts, for each run
        if dry_run or (slurm and os.environ.get("DATA_ROOT")):  # DATA_ROOT: the job script points data.root there
            return []
        return pf.check_dataset(cfg)

    spec = build(config, overrides, world, checks)
    sweep_dir = Path(run_dir or default_dir(spec.runs[0].cfg.preset)).resolve()
    state = _new_state(spec, sweep_dir)
    if slurm:
        from . import array

        array.render(spec, state, state.runs, max_parallel, nodes, gpus_per_node, partition, time_limit)
        if not dry_run and not shutil.which("sbatch"):
            raise UserError(f"--nodes {nodes} needs Slurm, but sbatch is not on PATH; run on a Slurm login node, or "
                            "sweep locally without --nodes")
    if dry_run:
        print(listing(spec, sweep_dir), file=out)
        if slurm:
            from launch import slurm as sl

            cfg = spec.runs[0].cfg
            print(f"slurm: one job array of {len(spec.runs)} tasks"
                  f"{f' (at most {max_parallel} at a time)' if max_parallel else ''}; each task:\n"
                  + sl.describe(cfg, sweep_dir / "<run>", nodes, gpus_per_node, partition, time_limit), file=out)
        return 0

    # Relaunch checks, all before anything is written.
    if st.path_of(sweep_dir).is_file():
        old = st.load(sweep_dir)
        st.check_same_sweep(old, state.config, state.fixed, state.axes)
        state = old  # same config and axes: the same runs, in the same order, in the same directories
        check_not_running(sweep_dir)
        if state.slurm_array_job_ids and shutil.which("scontrol"):
            from .array import check_no_active_array

            check_no_active_array(state)
    elif sweep_dir.is_dir() and any(sweep_dir.iterdir()):
        raise UserError(f"--run-dir {sweep_dir} exists and is not a sweep (no sweep.json); give a new or empty "
                        "folder")
    pf.raise_if(pf.check_writable_dir(sweep_dir, "--run-dir"))

    with sweep_lock(sweep_dir):
        st.refresh_from_runs(state)
        parent = open_parent(spec.runs[0].cfg, sweep_dir, spec.axes, spec.fixed, len(spec.runs))
        state.mlflow_parent_run_id = parent.run_id
        state.mlflow_tracking_uri = parent.tracking_uri
        state.experiment = getattr(parent, "experiment_name", None)
        state.finalized = False
        state.mode = "slurm" if slurm else "local"
        st.save(state)
        print(f"sweep {sweep_dir}: {len(state.runs)} runs, {sum(r.status == 'completed' for r in state.runs)} "
              f"completed before; parent run {parent.run_id or '(tracking off)'}", file=sys.stderr)
        if slurm:
            from .array import submit_sweep

            return submit_sweep(spec, state, parent, nodes, gpus_per_node, partition, time_limit, max_parallel,
                                out)
        code = run_sweep(state, parent, launch_one)
    from .status import table

    print("\n" + table(state), file=out)
    return code
