#!/bin/bash
# Rendered by `orchestrator sweep` for preset digits: a job array of 3 runs, at most 2 at a time;
# each task is one training job of 2 x 1 ranks (one srun task per GPU).
#SBATCH --job-name=ablation
#SBATCH --array=0-2%2
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:20:00
#SBATCH --partition=debug
#SBATCH --account=snn
#SBATCH --signal=B:USR2@60
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/scratch/sweeps/ablation/slurm-%A_%a.out

# The sweep's runs, by array index: run directory and overrides (in order); see sweep.json.
config=digits
case "${SLURM_ARRAY_TASK_ID:-}" in
  0) run_dir=/scratch/sweeps/ablation/danet18-T1-spiking
     set -- train.epochs=1 tracking.run_name=danet18-T1-spiking 'tracking.parent_run_id="12e45"' ;;
  1) run_dir=/scratch/sweeps/ablation/danet18-T1-da_membrane_network
     set -- train.epochs=1 tracking.run_name=danet18-T1-da_membrane_network 'tracking.parent_run_id="12e45"' ;;
  2) run_dir=/scratch/sweeps/ablation/danet18-T2-spiking
     set -- train.epochs=1 tracking.run_name=danet18-T2-spiking 'tracking.parent_run_id="12e45"' ;;
  *) echo "error: array task '${SLURM_ARRAY_TASK_ID:-}' is not a run of this sweep (/scratch/sweeps/ablation/sweep.json)"; exit 2 ;;
esac
export DANET_HOME=${DANET_HOME:-/opt/danet-orchestrator}
# ---- shared with launch/slurm.py (BODY): keep the two identical -------------------------------------------
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
