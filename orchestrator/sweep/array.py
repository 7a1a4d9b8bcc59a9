"""A sweep on Slurm: one job array (a task per run that has not completed) and a small job after it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TextIO

from launch import slurm as sl
from orchestrator.errors import UserError
from orchestrator.tracking.tracker import NoopTracker

from . import state as st
from .finish import finalize
from .local import child_overrides
from .spec import SweepSpec


def render(spec: SweepSpec, state: st.SweepState, runs: list[st.RunState], max_parallel: int | None,
           nodes: int, gpus_per_node: int | None, partition: str | None, time: str | None) -> str:
    """The array script for ``runs``. Every run must make the same #SBATCH header (one array, one shape): an
    axis that would change it (launch.time, train.device, ...) is a clear error."""
    texts = {}
    tasks = [(r.index, r.run_dir, child_overrides(r, state.mlflow_parent_run_id)) for r in runs]
    for r in runs:
        cfg = spec.runs[r.index].cfg
        texts[r.name] = sl.render_array_sbatch(cfg, state.dir, spec.config_arg, tasks, Path(state.dir).name,
                                               max_parallel, nodes, gpus_per_node, partition, time)
    first = runs[0].name
    for name, text in texts.items():
        if text != texts[first]:
            a = [ln for ln in texts[first].splitlines() if ln.startswith("#SBATCH")]
            b = [ln for ln in text.splitlines() if ln.startswith("#SBATCH")]
            diff = next(((x, y) for x, y in zip(a, b, strict=False) if x != y), (a, b))
            raise UserError(f"runs {first} and {name} need different Slurm jobs ({diff[0]} vs {diff[1]}); a job "
                            "array has one shape for all its tasks: make that setting a fixed override, not an axis")
    return texts[first]


def check_no_active_array(state: st.SweepState) -> None:
    """A relaunch while an earlier array of this sweep still has tasks queued or running would train them twice."""
    for job in state.slurm_array_job_ids:
        states = sl.array_states(job)
        active = sorted(t for t, s in states.items() if s in sl.ACTIVE_STATES)
        if active:
            raise UserError(f"job array {job} of sweep {state.dir} still has {len(active)} task(s) queued or running "
                            f"(tasks {sl.task_ranges(active)}); wait for it (orchestrator sweep status {state.dir}) "
                            f"or cancel it (orchestrator cancel {job}), then relaunch")


def submit_sweep(spec: SweepSpec, state: st.SweepState, parent: NoopTracker, nodes: int,
                 gpus_per_node: int | None, partition: str | None, time: str | None, max_parallel: int | None,
                 out: TextIO = sys.stdout) -> int:
    """Submit the runs that have not completed as ONE job array (``%max_parallel``), then the finishing job that
    waits for every task (``afterany``) and logs the comparison figures. The parent run stays RUNNING meanwhile."""
    todo = [r for r in state.runs if r.status != "completed"]
    sweep_dir = Path(state.dir)
    if not todo:
        print(f"sweep: all {len(state.runs)} runs completed before; nothing to submit", file=sys.stderr)
        if state.finalized:
            parent.finish("completed")
        else:
            finalize(state, parent)
        return 0
    text = render(spec, state, todo, max_parallel, nodes, gpus_per_node, partition, time)
    job = sl.submit(text, sweep_dir, "sbatch.sh")
    state.mode, state.slurm_array_job_id, state.finalized = "slurm", job, False
    state.slurm_array_job_ids.append(job)
    for r in todo:
        r.status, r.log = "pending", str(sweep_dir / f"slurm-{job}_{r.index}.out")
    st.save(state)
    cfg = spec.runs[todo[0].index].cfg
    try:
        finish_job = sl.submit(sl.render_finish_sbatch(cfg, sweep_dir, sweep_dir.name, partition), sweep_dir,
                               "finish.sbatch.sh", (f"--dependency=afterany:{job}",))
        state.slurm_finish_job_id = finish_job
        st.save(state)
    except UserError as e:  # the array is in: the figures can still come from `orchestrator sweep status`
        finish_job = None
        print(f"sweep: warning: the finishing job was not submitted ({e}); run `orchestrator sweep status "
              f"{sweep_dir}` once the array has ended", file=sys.stderr)
    parent.finish("requeued")  # flushed, left RUNNING: the finishing job ends it
    print(f"submitted job array {job}: {len(todo)} of {len(state.runs)} runs"
          f"{f', at most {max_parallel} at a time' if max_parallel else ''}\n"
          f"{sl.describe(cfg, sweep_dir / '<run>', nodes, gpus_per_node, partition, time)}\n"
          f"logs         {sweep_dir}/slurm-{job}_<index>.out\n"
          f"after it     job {finish_job or '(none)'}: comparison figures on the parent run\n"
          f"mlflow       parent run {state.mlflow_parent_run_id or '(tracking off)'} at {state.mlflow_tracking_uri}\n"
          f"status       orchestrator sweep status {sweep_dir}   cancel: orchestrator cancel {job}", file=out)
    return 0
