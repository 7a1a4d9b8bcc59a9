"""Slurm: describe a job, render its sbatch script (a pure function), submit it, and query / cancel / show logs.

Only ``submit``, ``status``, ``cancel`` (and ``logs``, through the same ``scontrol`` query ``status`` uses) run
commands; ``describe`` and ``render_sbatch`` read nothing but their arguments, so the rendered script is tested
byte for byte against ``tests/data/expected_sbatch_digits.sh`` and then run on a real (local) cluster.

One job = one srun step with one task per GPU, each task running the per-rank entry
``python -m orchestrator train --config NAME --run-dir DIR [overrides]`` (ranks come from SLURM_* through
``launch.env``). The batch shell around the step is ``BODY`` below; ``slurm/danet152.sh`` carries the same text
(a test checks it), so the hand-written paper script and rendered scripts behave the same way:

* Time limit: ``--signal=B:USR2@LEAD`` warns the *batch shell*, which forwards USR2 to the step (srun passes it
  to every task). Every rank checkpoints, rank 0 writes ``RUN_DIR/REQUEUE`` and the ranks exit (code 3); the
  shell then runs ``scontrol requeue``. The requeue decision lives in the shell, not in rank 0, because the
  shell knows the warning came even when the ranks could not act on it (signalled during start-up, or crashed
  while saving): the job comes back either way, resuming from the newest *complete* checkpoint. A requeue that
  made no progress since the previous one is not repeated, so a too-short limit cannot loop forever.
* USR2, not USR1: NCCL may install its own USR1 handler, which would swallow the warning and let the job run
  into its limit without a checkpoint (submitit avoids USR1 for the same reason).
* ``--requeue --open-mode=append``: the restarted job keeps its id, run directory and log (one log per job).
* A dying rank: ``srun --kill-on-bad-exit=1`` ends the whole step as soon as any task exits non-zero, so the
  job fails within seconds, with srun's ``task N: Exited with exit code C`` and the rank's own error in the log.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time as _time
from pathlib import Path
from typing import TextIO

from orchestrator.config.schema import Config
from orchestrator.errors import UserError

# The pre-timeout signal. orchestrator.train.signals.StopRequests handles the same signal.
SIGNAL = "USR2"
MIN_LEAD_S = 30
# Slurm's limit checker runs about every 30 s and sends the warning once "remaining <= lead + 30 s", so the
# warning arrives between `lead` and about `lead + 60` s before the end. See signal_lead().
EARLY_S = 60

# The part of every batch script after its #SBATCH header and argument defaults. Kept verbatim in
# slurm/danet152.sh (tests/test_slurm.py checks that). It reads its arguments from "$@".
BODY = r"""# ---- shared with launch/slurm.py (BODY): keep the two identical -------------------------------------------
set -uo pipefail
say() { echo "== $(date -u +%H:%M:%S) job ${SLURM_JOB_ID}: $*"; }

# The repository: sbatch runs a *copy* of this script from slurmd's spool directory, so the script's own path
# says nothing. DANET_HOME if set; else the submit directory if it holds the project; else the parent of the
# submitted script's folder (scontrol knows the original path).
if [ -z "${DANET_HOME:-}" ]; then
  if [ -d "${SLURM_SUBMIT_DIR:-$PWD}/orchestrator" ]; then
    DANET_HOME=${SLURM_SUBMIT_DIR:-$PWD}
  else
    submitted=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')
    DANET_HOME=$(cd "$(dirname "${submitted:-.}")/.." 2>/dev/null && pwd)
  fi
fi
export DANET_HOME
# shellcheck disable=SC1091
if [ -f "$DANET_HOME/.venv/bin/activate" ]; then source "$DANET_HOME/.venv/bin/activate"; fi
if ! python -c 'import orchestrator' 2>/dev/null; then
  say "error: cannot import orchestrator (DANET_HOME=$DANET_HOME); set DANET_HOME to the repository"
  exit 2
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$DANET_HOME/.cache/torch_extensions}
export PYTHONUNBUFFERED=1
# Since Slurm 22.05 srun no longer inherits --cpus-per-task from sbatch.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$SLURM_CPUS_PER_TASK}
fi

# Arguments go to the training entry unchanged; --config and --run-dir are only looked at (their defaults
# come from above, and the shell needs the run directory for the requeue marker).
args=()
while [ $# -gt 0 ]; do
  case $1 in
    --config|--run-dir)
      [ $# -ge 2 ] || { say "error: $1 needs a value"; exit 2; }
      if [ "$1" = --config ]; then config=$2; else run_dir=$2; fi
      shift 2 ;;
    --config=*) config=${1#*=}; shift ;;
    --run-dir=*) run_dir=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
# The job id survives requeues, so a restarted job finds its own run directory again.
run_dir=${run_dir:-${SLURM_SUBMIT_DIR:-$PWD}/runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}}
case $run_dir in /*) ;; *) run_dir=$PWD/$run_dir ;; esac
if [ -n "${DATA_ROOT:-}" ]; then args=("data.root=$DATA_ROOT" "${args[@]}"); fi  # a later data.root= wins
mkdir -p "$run_dir" || { say "error: cannot create run directory $run_dir"; exit 2; }
# One job per run directory (launch/runlock.py): this shell holds RUN_DIR/.run.lock for the whole job, so a job
# started there meanwhile, by Slurm or by hand, is refused. A requeued start waits up to 120 s instead: on a
# shared file system its previous start's lock can outlive a lost node for a lock lease.
if command -v flock >/dev/null 2>&1; then
  exec 9>>"$run_dir/.run.lock"
  flock -n 9 || { [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] &&
    say "run dir $run_dir is locked (by this job's previous start?); waiting up to 120 s for it" && flock -w 120 9; } || {
    say "error: $(python -c 'import sys; from launch import runlock as r; d = sys.argv[1]
print(r.busy_line(d, r.describe_holder(r.lock_path(d))))' "$run_dir")"
    exit 2
  }
  printf '{"pid": %d, "host": "%s", "slurm_job": "%s", "started": "%s"}\n' "$$" "$(hostname)" "$SLURM_JOB_ID" \
    "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "$run_dir/.run.lock"
  export DANET_RUN_LOCK_JOB=$SLURM_JOB_ID  # the tasks: this shell holds it (a bare srun's rank 0 takes it itself)
else
  say "warning: no flock(1) here: a second job started in $run_dir would not be refused"
fi
rm -f "$run_dir/REQUEUE"

# Pre-timeout warning (#SBATCH --signal=B:USR2@LEAD reaches this shell only): forward it to the training step.
# TERM (scancel, the time limit itself, preemption) reaches every process of the job directly; the shell only
# notes it and keeps waiting so the ranks' checkpoint is not cut short by the shell exiting first.
warned=0
step_pid=
on_warning() {
  warned=1
  say "pre-timeout signal: every rank checkpoints and stops; the job will be requeued"
  if [ -n "$step_pid" ]; then kill -USR2 "$step_pid" 2>/dev/null; fi
}
trap on_warning USR2
trap 'say "TERM received (cancelled, preempted or out of time)"' TERM

say "start ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks on $SLURM_JOB_NUM_NODES nodes ($SLURM_JOB_NODELIST)"
say "run dir $run_dir, config $config, overrides: ${args[*]:-none}"
# One task per GPU; counts come from the allocation (SLURM_NTASKS...), so sbatch's command-line flags win.
srun --kill-on-bad-exit=1 python -m orchestrator train --config "$config" --run-dir "$run_dir" "${args[@]}" &
step_pid=$!
if [ "$warned" = 1 ]; then kill -USR2 "$step_pid" 2>/dev/null; fi  # the warning beat srun's start
# `wait` returns early (status > 128) whenever a trapped signal arrives: wait until srun itself has ended.
while :; do
  wait "$step_pid"
  rc=$?
  kill -0 "$step_pid" 2>/dev/null || break
done

if [ "$rc" = 0 ] && [ ! -f "$run_dir/REQUEUE" ]; then
  say "training finished; summary: $run_dir/summary.json"
  exit 0
fi
if [ -f "$run_dir/REQUEUE" ] || [ "$warned" = 1 ]; then
  # REQUEUE holds the step rank 0 checkpointed at; "none" = the ranks stopped before saving anything.
  marker=$(cat "$run_dir/REQUEUE" 2>/dev/null || echo none)
  if [ "$marker" = "$(cat "$run_dir/.requeued-at" 2>/dev/null)" ]; then
    say "error: no progress since the previous requeue (step $marker); not requeueing. Give the job a longer" \
        "--time, or a longer lead (--signal=B:USR2@SECONDS)"
    exit 1
  fi
  echo "$marker" > "$run_dir/.requeued-at"
  rm -f "$run_dir/REQUEUE"
  say "requeueing (checkpoint at step $marker; training step exit code $rc)"
  job_ref=$SLURM_JOB_ID
  if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then job_ref=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi  # array task
  scontrol requeue "$job_ref" && exit 0
  say "error: scontrol requeue failed; resubmit with the same --run-dir to resume"
  exit 1
fi
say "error: training step failed with exit code $rc; the failing rank's error and srun's" \
    "'task N: Exited with exit code C' are above"
exit "$rc"
"""


# --- time limits and the warning lead ----------------------------------------------------------------------------
def parse_time(limit: str) -> int | None:
    """Seconds in a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS); None = no limit."""
    s = str(limit).strip()
    if s.upper() in ("INFINITE", "UNLIMITED", "-1", ""):
        return None
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", s)
    if not m:
        raise UserError(f"launch.time={limit!r} is not a Slurm time limit (e.g. 30, 04:00:00, 2-00:00:00)")
    days, a, b, c = m.groups()
    if days is not None:  # D-HH[:MM[:SS]]
        secs = int(days) * 86400 + int(a) * 3600 + int(b or 0) * 60 + int(c or 0)
    elif c is not None:  # HH:MM:SS
        secs = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # MM:SS
        secs = int(a) * 60 + int(b)
    else:  # MM
        secs = int(a) * 60
    if secs <= 0:
        raise UserError(f"launch.time={limit!r} must be positive")
    return secs


def signal_lead(limit_s: int | None, configured_s: int) -> int:
    """Seconds before the time limit at which Slurm warns the job: ``min(configured, max(30, limit / 4))``.

    The warning arrives between ``lead`` and about ``lead + 60`` s before the end (Slurm checks limits every
    ~30 s and sends it early rather than late), and the kill comes at the limit. The floor of 30 s keeps room for
    a checkpoint and the MLflow flush; the cap of a quarter of the limit keeps a short job's warning from
    arriving before it has trained at all (the paper preset's 300 s lead would warn a 3-minute job at once)."""
    if limit_s is None:
        return configured_s
    return max(1, min(configured_s, max(MIN_LEAD_S, limit_s // 4)))


# --- describe / render (pure) ------------------------------------------------------------------------------------
def _resources(cfg: Config, nodes: int | None, gpus_per_node: int | None, partition: str | None,
               time: str | None) -> dict:
    launch = cfg.launch
    nodes = int(nodes or launch.nodes)
    gpn = launch.gpus_per_node if gpus_per_node is None else int(gpus_per_node)
    if nodes < 1 or gpn < 0:
        raise UserError(f"--nodes must be >= 1 and --gpus-per-node >= 0 (got {nodes} and {gpn})")
    limit = time or launch.time
    limit_s = parse_time(limit)
    lead = signal_lead(limit_s, launch.signal_lead_s)
    if limit_s is not None and limit_s <= lead + EARLY_S:
        raise UserError(f"time limit {limit} is too short: the pre-timeout signal ({lead} s lead, delivered up to "
                        f"{EARLY_S} s early) would come before training starts; use at least 00:02:00")
    return dict(nodes=nodes, tasks_per_node=max(1, gpn), gpus_per_node=gpn if cfg.train.device != "cpu" else 0,
                partition=partition if partition is not None else launch.partition, time=limit, limit_s=limit_s,
                lead=lead)


def describe(cfg: Config, run_dir: Path, nodes: int | None = None, gpus_per_node: int | None = None,
             partition: str | None = None, time: str | None = None) -> str:
    """A few lines saying what the job will be: shape, limit, warning lead, where its outputs go."""
    r = _resources(cfg, nodes, gpus_per_node, partition, time)
    world = r["nodes"] * r["tasks_per_node"]
    gpus = f", {r['gpus_per_node']} GPUs/node" if r["gpus_per_node"] else ""
    return "\n".join([
        f"slurm job {cfg.preset}: {r['nodes']} nodes x {r['tasks_per_node']} tasks = world size {world}{gpus}, "
        f"{cfg.launch.cpus_per_task} CPUs/task, partition {r['partition'] or '(default)'}",
        f"time limit {r['time']}; {SIGNAL} {r['lead']} s before it: checkpoint, requeue, resume",
        f"run dir {run_dir}  (log slurm-<job>.out, checkpoints/, summary.json)",
    ])


def _sbatch_options(cfg: Config, r: dict, job_name: str, output: str, array: str | None = None) -> list[str]:
    """The #SBATCH options of a training job (or of each task of a job array)."""
    launch = cfg.launch
    opts = [f"--job-name={job_name}"] + ([f"--array={array}"] if array else [])
    opts += [f"--nodes={r['nodes']}", f"--ntasks-per-node={r['tasks_per_node']}"]
    if r["gpus_per_node"]:
        opts.append(f"--gpus-per-node={r['gpus_per_node']}")
    opts += [f"--cpus-per-task={launch.cpus_per_task}", f"--time={r['time']}"]
    opts += [f"--{k}={v}" for k, v in (("partition", r["partition"]), ("account", launch.account),
                                       ("mem", launch.mem)) if v]
    opts += [f"--signal=B:{SIGNAL}@{r['lead']}", "--requeue", "--open-mode=append", f"--output={output}"]
    opts += [o if o.startswith("-") else f"--{o}" for o in launch.extra_sbatch]
    return opts


def render_sbatch(cfg: Config, run_dir: str | Path, config_arg: str, overrides: list[str] | tuple[str, ...] = (),
                  nodes: int | None = None, gpus_per_node: int | None = None, partition: str | None = None,
                  time: str | None = None, home: str | Path | None = None) -> str:
    """The sbatch script for one training job (pure: same arguments, same text).

    ``config_arg`` is what the ranks get as ``--config`` (a preset name or an absolute YAML path), ``overrides``
    the user's key=value list, ``run_dir`` an absolute path, ``home`` the repository the job runs from
    (default: the one this module lives in). Resource arguments left None come from ``cfg.launch``.
    """
    r = _resources(cfg, nodes, gpus_per_node, partition, time)
    run_dir = Path(run_dir)
    home = Path(home) if home is not None else Path(__file__).resolve().parents[1]
    opts = _sbatch_options(cfg, r, cfg.preset, f"{run_dir}/slurm-%j.out")
    lines = ["#!/bin/bash",
             f"# Rendered by `orchestrator launch` for preset {cfg.preset}: "
             f"{r['nodes']} x {r['tasks_per_node']} ranks, one srun task per GPU.",
             *[f"#SBATCH {o}" for o in opts],
             "",
             "# What `orchestrator launch` was given: preset or YAML, run directory, overrides (in order).",
             f"config={shlex.quote(config_arg)}",
             f"run_dir={shlex.quote(str(run_dir))}",
             "set -- " + " ".join(shlex.quote(a) for a in overrides),
             f"export DANET_HOME=${{DANET_HOME:-{shlex.quote(str(home))}}}",
             ""]
    return "\n".join(lines) + BODY


def task_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (sbatch --array's list form)."""
    out: list[str] = []
    ids = sorted(set(indices))
    start = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[k - 1] + 1:  # a run of consecutive ids ends at k - 1
            a, b = ids[start], ids[k - 1]
            out.append(str(a) if a == b else f"{a}-{b}")
            start = k
    return ",".join(out)


def render_array_sbatch(cfg: Config, sweep_dir: str | Path, config_arg: str,
                        tasks: list[tuple[int, str | Path, list[str]]], job_name: str,
                        max_parallel: int | None = None, nodes: int | None = None, gpus_per_node: int | None = None,
                        partition: str | None = None, time: str | None = None, home: str | Path | None = None) -> str:
    """The sbatch script of a sweep: ONE job array, one task per run (pure: same arguments, same text).

    ``tasks`` are ``(array index, absolute run directory, overrides)``; the task picks its run directory and
    overrides by ``SLURM_ARRAY_TASK_ID`` from the table in the script, then runs ``BODY`` as a single job does:
    a full multi-rank srun step, the pre-timeout checkpoint, and a requeue of just that task
    (``scontrol requeue ARRAYJOB_TASK``). At most ``max_parallel`` tasks run at once (``%K``)."""
    if not tasks:
        raise ValueError("render_array_sbatch: no tasks")
    r = _resources(cfg, nodes, gpus_per_node, partition, time)
    sweep_dir = Path(sweep_dir)
    home = Path(home) if home is not None else Path(__file__).resolve().parents[1]
    array = task_ranges([i for i, _, _ in tasks]) + (f"%{int(max_parallel)}" if max_parallel else "")
    opts = _sbatch_options(cfg, r, job_name, f"{sweep_dir}/slurm-%A_%a.out", array=array)
    limit = f", at most {max_parallel} at a time" if max_parallel else ""
    lines = ["#!/bin/bash",
             f"# Rendered by `orchestrator sweep` for preset {cfg.preset}: a job array of {len(tasks)} runs{limit};",
             f"# each task is one training job of {r['nodes']} x {r['tasks_per_node']} ranks (one srun task per GPU).",
             *[f"#SBATCH {o}" for o in opts],
             "",
             "# The sweep's runs, by array index: run directory and overrides (in order); see sweep.json.",
             f"config={shlex.quote(config_arg)}",
             'case "${SLURM_ARRAY_TASK_ID:-}" in']
    for index, run_dir, overrides in tasks:
        lines += [f"  {index}) run_dir={shlex.quote(str(run_dir))}",
                  "     set -- " + " ".join(shlex.quote(a) for a in overrides) + " ;;"]
    lines += ['  *) echo "error: array task \'${SLURM_ARRAY_TASK_ID:-}\' is not a run of this sweep'
              f' ({shlex.quote(str(sweep_dir))}/sweep.json)"; exit 2 ;;',
              "esac",
              f"export DANET_HOME=${{DANET_HOME:-{shlex.quote(str(home))}}}",
              ""]
    return "\n".join(lines) + BODY


def render_finish_sbatch(cfg: Config, sweep_dir: str | Path, job_name: str, partition: str | None = None,
                         home: str | Path | None = None) -> str:
    """A one-CPU job, submitted to start after every task of a sweep's array: ``orchestrator sweep status DIR``,
    which refreshes sweep.json and, once every run has ended, logs the comparison figures to the parent run
    and ends it (pure)."""
    sweep_dir = Path(sweep_dir)
    home = Path(home) if home is not None else Path(__file__).resolve().parents[1]
    part = partition if partition is not None else cfg.launch.partition
    opts = [f"--job-name={job_name}-finish", "--nodes=1", "--ntasks=1", "--cpus-per-task=1", "--time=00:15:00"]
    opts += [f"--{k}={v}" for k, v in (("partition", part), ("account", cfg.launch.account)) if v]
    opts += [f"--output={sweep_dir}/slurm-finish-%j.out"]
    lines = ["#!/bin/bash",
             "# Rendered by `orchestrator sweep`: after the array, refresh sweep.json, log the comparison figures.",
             *[f"#SBATCH {o}" for o in opts],
             "",
             f"export DANET_HOME=${{DANET_HOME:-{shlex.quote(str(home))}}}",
             '# shellcheck disable=SC1091',
             'if [ -f "$DANET_HOME/.venv/bin/activate" ]; then source "$DANET_HOME/.venv/bin/activate"; fi',
             f"exec python -m orchestrator sweep status {shlex.quote(str(sweep_dir))}",
             ""]
    return "\n".join(lines)


# --- submit / launch ---------------------------------------------------------------------------------------------
def _slurm(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    if not shutil.which(cmd[0]):
        raise UserError(f"{cmd[0]} is not on PATH: this machine has no Slurm client (run on a login node)")
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"{' '.join(cmd[:2])} did not answer within {timeout:.0f} s; is slurmctld up?") from None


def submit(script_text: str, run_dir: str | Path, name: str = "sbatch.sh", sbatch_args: tuple[str, ...] = ()) -> str:
    """Write the script to ``run_dir/<name>`` (a record of what ran) and submit it (``sbatch_args`` go before
    the script, e.g. a dependency); returns the job id.

    The job runs in the current directory (relative paths in the config, the default MLflow store) as a local
    run would."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / name
    path.write_text(script_text)
    p = _slurm(["sbatch", "--parsable", *sbatch_args, str(path)])
    if p.returncode != 0:
        msg = (p.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"sbatch refused the job: {msg} (script: {path})")
    return p.stdout.strip().split(";")[0]


def launch(cfg: Config, run_dir: Path, config_arg: str, overrides: list[str], nodes: int | None = None,
           gpus_per_node: int | None = None, partition: str | None = None, time: str | None = None,
           out: TextIO = sys.stdout) -> int:
    """Render, submit, and say where the job's outputs will be. Returns the CLI's exit code."""
    run_dir = Path(run_dir).resolve()
    text = render_sbatch(cfg, run_dir, config_arg, overrides, nodes, gpus_per_node, partition, time)
    job = submit(text, run_dir)
    uri = cfg.tracking.tracking_uri or "sqlite:///mlflow.db (in " + str(Path.cwd()) + ")"
    print(f"submitted job {job}\n{describe(cfg, run_dir, nodes, gpus_per_node, partition, time)}\n"
          f"log          {run_dir}/slurm-{job}.out   (orchestrator logs {job} -f)\n"
          f"checkpoints  {run_dir}/checkpoints\n"
          f"mlflow       {uri}; the run id is written to {run_dir}/summary.json\n"
          f"status       orchestrator status {job}   cancel: orchestrator cancel {job}", file=out)
    return 0


# --- status / cancel / logs --------------------------------------------------------------------------------------
def job_info(job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, ExitCode, RestartCnt, StdOut, ...); {} when Slurm no longer
    knows the job (finished more than MinJobAge ago)."""
    _check_job_id(job_id)
    p = _slurm(["scontrol", "show", "job", "-o", str(job_id)])
    if p.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", p.stdout))


def _check_job_id(job_id: str) -> None:
    if not re.fullmatch(r"\d+(_\d+)?", str(job_id)):
        raise UserError(f"'{job_id}' is not a Slurm job id")


def status(job_id: str | None = None) -> str:
    """One line per job: the given job (also after it ended, while Slurm remembers it) or all queued jobs."""
    if job_id is None:
        p = _slurm(["squeue", "-o", "%.10i %.20j %.9T %.10M %.10l %.6D %R"])
        if p.returncode != 0:
            raise UserError(f"squeue failed: {p.stderr.strip()}")
        return p.stdout.rstrip()
    info = job_info(job_id)
    if not info:
        raise UserError(f"Slurm does not know job {job_id} (never submitted, or ended long ago)")
    return (f"job {job_id} {info.get('JobName', '')}: {info.get('JobState', '?')}"
            f" (reason {info.get('Reason', 'None')}), exit code {info.get('ExitCode', '?')},"
            f" restarts {info.get('Restarts', '0')}, elapsed {info.get('RunTime', '?')} of"
            f" {info.get('TimeLimit', '?')}, nodes {info.get('NodeList', '?')}, log {info.get('StdOut', '?')}")


ACTIVE_STATES = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
                 "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}


def _task_ids(text: str) -> list[int]:
    """``"3"``, ``"2-3%2"``, ``"[1,4-5%2]"`` -> the array task ids they name."""
    out: list[int] = []
    for part in text.strip("[]").split("%")[0].split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?(?::(\d+))?", part.strip())
        if m:
            a, b, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
            out += list(range(a, b + 1, step))
    return out


def array_states(array_job_id: str) -> dict[int, str]:
    """JobState of each task of a job array, by task id: from ``scontrol`` (which lists the pending tasks as
    one record), then ``sacct`` for tasks scontrol has forgotten (ended more than MinJobAge ago), where
    accounting is on. Tasks neither knows are absent."""
    _check_job_id(array_job_id)
    states: dict[int, str] = {}
    p = _slurm(["scontrol", "show", "job", "-o", str(array_job_id)])
    if p.returncode == 0:
        for line in p.stdout.splitlines():
            info = dict(re.findall(r"(\w+)=(\S*)", line))
            if info.get("ArrayJobId") == str(array_job_id) and "ArrayTaskId" in info:
                for t in _task_ids(info["ArrayTaskId"]):
                    states[t] = info.get("JobState", "?")
    if shutil.which("sacct"):
        try:
            q = subprocess.run(["sacct", "-n", "-P", "-X", "-j", str(array_job_id), "-o", "JobID,State"],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            q = None
        if q is not None and q.returncode == 0:
            for line in q.stdout.splitlines():
                job, _, state = line.partition("|")
                if job.startswith(f"{array_job_id}_") and state:
                    for t in _task_ids(job.split("_", 1)[1]):
                        states.setdefault(t, state.split()[0])
    return states


def cancel(job_id: str) -> None:
    """scancel the job (its ranks get TERM and checkpoint before they exit)."""
    _check_job_id(job_id)
    p = _slurm(["scancel", str(job_id)])
    if p.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {p.stderr.strip()}")


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


def logs(job_id: str, follow: bool = False, out: TextIO = sys.stdout, poll_s: float = 1.0) -> None:
    """Print the job's log; with ``follow``, keep printing as it grows until the job has ended."""
    info = job_info(job_id)
    path = Path(info["StdOut"]) if info.get("StdOut") else None
    if path is None:
        hits = sorted(Path.cwd().glob(f"runs/*/slurm-{job_id}.out")) + sorted(Path.cwd().glob(f"*-{job_id}.out"))
        path = hits[0] if hits else None
    if path is None:
        raise UserError(f"no log found for job {job_id} (Slurm no longer knows it and no runs/*/slurm-{job_id}.out)")
    pos = 0
    while True:
        if path.is_file():
            with open(path, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            out.write(chunk)
            out.flush()
        if not follow:
            if not path.is_file():
                raise UserError(f"job {job_id} has not written its log {path} yet")
            return
        state = info.get("JobState", "")
        if state in FINAL_STATES or (not info and path.is_file()):
            return
        _time.sleep(poll_s)
        info = job_info(job_id)
