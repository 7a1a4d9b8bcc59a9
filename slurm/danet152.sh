#!/bin/bash
# DANet-152 on ImageNet-1k, the paper's run (arXiv 2311.05171): T=4, 224 px, FFRecord data read by DALI,
# DeepSpeed data parallel over 4 nodes x 8 GPUs = 32 ranks (global batch 1024 = 32 per GPU).
#
#   sbatch slurm/danet152.sh                                   # the paper's run, preset danet152_imagenet
#   DATA_ROOT=/scratch/imagenet-ffr sbatch slurm/danet152.sh   # dataset elsewhere (-> data.root=...)
#   RUN_DIR=/scratch/runs/d152 sbatch slurm/danet152.sh        # run directory (default runs/<job name>-<job id>)
#   sbatch --nodes=2 --partition=a100 slurm/danet152.sh train.epochs=100    # flags override the #SBATCH lines
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=1 --cpus-per-task=1 --time=00:10:00 \
#       slurm/danet152.sh --config digits train.epochs=1      # the same machinery on CPUs, small
#
# Arguments go to each rank's `python -m orchestrator train` unchanged: --config NAME|YAML, --run-dir DIR and
# key=value overrides. Every task of the single srun step is one rank; ranks, world size and the rendezvous
# address (first node of the allocation, port derived from the job id) come from SLURM_* (launch/env.py), so
# the counts below are only defaults: sbatch's command-line flags replace them and nothing below repeats them.
#
# Time limit: USR2 reaches this shell --signal's lead before the limit; every rank checkpoints, the job is
# requeued (same id, same run directory, same log, same MLflow run) and resumes from the newest complete
# checkpoint. With a much shorter --time, also shorten the lead, e.g. --time=00:30:00 --signal=B:USR2@120
# (`orchestrator launch` does that for you: lead = min(configured, max(30 s, limit / 4))).
# Site knobs: preemption with PreemptMode=REQUEUE sends TERM (ranks checkpoint as well); with
# SlurmctldParameters=preempt_send_user_signal it sends USR2 first, which this script handles as above.
#SBATCH --job-name=danet152
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8          # one task (rank) per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8            # DALI decoding threads + the rank itself
#SBATCH --time=2-00:00:00            # per start; a requeued job gets the full limit again
#SBATCH --signal=B:USR2@300          # warn this shell 5 min before the limit: DeepSpeed checkpoint + MLflow flush
#SBATCH --requeue                    # may be requeued (by this script on the warning, or by preemption)
#SBATCH --open-mode=append           # a restarted job appends to the same log
#SBATCH --output=%x-%j.out           # one log per job, in the submit directory

# Defaults of the arguments (a --config / --run-dir argument wins; RUN_DIR may also come from the environment).
config=danet152_imagenet
run_dir=${RUN_DIR:-}

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
