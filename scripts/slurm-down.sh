#!/usr/bin/env bash
# slurm-down.sh - stop the local test cluster that slurm-up.sh started; idempotent.
#
# Jobs still in the cluster are cancelled first (so no slurmstepd or training rank outlives its slurmd), then the
# daemons are stopped in reverse start order. Each daemon runs in a session of its own (setsid), so its whole
# process group is signalled: TERM, then KILL after 10 s. A pid is only signalled if it still names the expected
# program: a stale pid file never hits someone else's process.
set -uo pipefail

BASE=${DANET_SLURM_BASE:-/tmp/danet-slurm}
RUN=$BASE/run
CONF=$BASE/etc/slurm.conf
say() { echo "slurm-down: $*" >&2; }

live_pid() {  # live_pid PIDFILE NAME -> the pid, if it is a live process called NAME
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -d "/proc/$pid" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] || return 1
  echo "$pid"
}

stop() {  # stop PIDFILE NAME
  local pid pgid
  if pid=$(live_pid "$1" "$2"); then
    pgid=$(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ')
    # The daemon leads its own session (setsid), so its group is exactly what slurm-up started; otherwise
    # signal the daemon alone.
    if [ "$pgid" = "$pid" ]; then kill -TERM -- "-$pgid" 2>/dev/null; else kill -TERM "$pid" 2>/dev/null; fi
    for _ in $(seq 1 100); do live_pid "$1" "$2" >/dev/null || break; sleep 0.1; done
    if live_pid "$1" "$2" >/dev/null; then
      say "$2 (pid $pid) still alive 10 s after TERM; killing it"
      if [ "$pgid" = "$pid" ]; then kill -KILL -- "-$pgid" 2>/dev/null; else kill -KILL "$pid" 2>/dev/null; fi
    fi
    say "stopped $2 (pid $pid)"
  fi
  rm -f "$1"
}

# 1. Cancel the cluster's jobs and give their steps a few seconds to end.
if live_pid "$RUN/slurmctld.pid" slurmctld >/dev/null && [ -f "$CONF" ]; then
  export SLURM_CONF=$CONF
  jobs=$(squeue -h -o '%A' 2>/dev/null | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    say "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null
    for _ in $(seq 1 50); do
      [ -z "$(squeue -h -o '%A' 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# 2. The daemons, in reverse start order.
shopt -s nullglob
for f in "$RUN"/slurmd-*.pid; do stop "$f" slurmd; done
stop "$RUN/slurmctld.pid" slurmctld
stop "$RUN/munged.pid" munged

# 3. Our /etc/hosts block (the /etc/slurm/slurm.conf link stays: harmless, and the next slurm-up rewrites it).
if grep -q '# BEGIN danet-slurm' /etc/hosts 2>/dev/null; then
  tmp=$(mktemp)
  sed '/# BEGIN danet-slurm/,/# END danet-slurm/d' /etc/hosts > "$tmp" && cat "$tmp" > /etc/hosts
  rm -f "$tmp"
fi
exit 0
