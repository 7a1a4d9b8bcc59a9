#!/usr/bin/env bash
# slurm-up.sh - a real Slurm cluster on this one machine, for the project's tests.
#
# Installs Debian's Slurm and MUNGE when they are missing, writes a cluster config under a state directory and
# starts munged + slurmctld + one slurmd per fake node ("multiple slurmd" mode: node1..nodeN are all 127.0.0.1,
# each slurmd on its own port). Every node declares fake GPUs (GRES backed by /dev/null clones), so
# `--gpus-per-node` requests schedule as on a GPU cluster and Slurm sets CUDA_VISIBLE_DEVICES.
#
# Idempotent: when the cluster under the state directory is already up, it only reports. A half-dead cluster
# (a daemon died) is stopped with slurm-down.sh and started clean. Exit 0 = every node idle; non-zero = one line
# saying why, with the relevant log tail.
#
# Knobs (environment, all optional):
#   DANET_SLURM_BASE     state dir: config, spool, logs, pid files   (default /tmp/danet-slurm)
#   DANET_SLURM_NODES    fake nodes                                  (default 4)
#   DANET_SLURM_CPUS     CPUs declared per node                      (default 64: DANet-152's 8 tasks x 8 CPUs fit)
#   DANET_SLURM_GPUS     fake GPUs per node                          (default 8)
#   DANET_SLURM_MEM_MB   RealMemory per node                         (default 4096; memory is not a consumable)
#   DANET_SLURM_PORT     slurmctld port; slurmd of nodeK uses PORT+K (default 16917)
#   DANET_SLURM_TIMEOUT  seconds to wait for all nodes idle          (default 60)
# Prints "export SLURM_CONF=..." on stdout; /etc/slurm/slurm.conf is also linked to the generated config so
# plain sbatch / srun / squeue work, and node1..nodeN are added to /etc/hosts (launch.env resolves the first
# host of the job's nodelist into MASTER_ADDR).
set -euo pipefail

BASE=$(realpath -m "${DANET_SLURM_BASE:-/tmp/danet-slurm}")  # absolute: the daemons start from inside it
NODES=${DANET_SLURM_NODES:-4}
CPUS=${DANET_SLURM_CPUS:-64}
GPUS=${DANET_SLURM_GPUS:-8}
MEM=${DANET_SLURM_MEM_MB:-4096}
PORT=${DANET_SLURM_PORT:-16917}
TIMEOUT=${DANET_SLURM_TIMEOUT:-60}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF=$BASE/etc/slurm.conf
RUN=$BASE/run
LOG=$BASE/log
MSOCK=$BASE/munge/munge.socket

say() { echo "slurm-up: $*" >&2; }
die() { echo "slurm-up: error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"
t0=$(date +%s)

# --- install ---------------------------------------------------------------------------------------------------
missing=0
for b in slurmctld slurmd sbatch srun squeue sinfo scontrol munged mungekey; do
  command -v "$b" >/dev/null 2>&1 || missing=1
done
if [ "$missing" = 1 ]; then
  command -v apt-get >/dev/null 2>&1 || die "Slurm is not installed and there is no apt-get to install it"
  say "installing Debian packages: slurmctld slurmd slurm-client munge"
  . "$HERE/apt-install.sh"
  apt_install /tmp/danet-slurm-apt.log slurmctld slurmd slurm-client munge \
    || die "apt-get could not install Slurm (log: /tmp/danet-slurm-apt.log)"
  say "installed in $(( $(date +%s) - t0 )) s"
fi

# --- helpers ---------------------------------------------------------------------------------------------------
# pid_alive PIDFILE NAME: the pid in PIDFILE is a live (non-zombie) process called NAME. Checking the name
# guards against a stale pid file whose number now belongs to someone else's process.
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && [ -d "/proc/$pid" ] || return 1
  ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}
# cwd_gone PIDFILE: the daemon's working directory was deleted (a cluster started from a checkout since removed,
# by an earlier slurm-up that did not cd). Every job step's slurmstepd inherits it and writes "Unable to get
# current working directory" into the job's own output, so such a cluster counts as half-dead.
cwd_gone() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" == *" (deleted)" ]]
}
idle_nodes() { { sinfo -h -N -t idle -o '%N' 2>/dev/null || true; } | sort -u | grep -c . || true; }
export SLURM_CONF=$CONF

# --- already up? -----------------------------------------------------------------------------------------------
up=1
pid_alive "$RUN/munged.pid" munged || up=0
pid_alive "$RUN/slurmctld.pid" slurmctld || up=0
for i in $(seq 1 "$NODES"); do
  pid_alive "$RUN/slurmd-node$i.pid" slurmd || up=0
  if [ "$up" = 1 ] && cwd_gone "$RUN/slurmd-node$i.pid"; then
    say "node$i's slurmd runs in a deleted directory (its jobs' output would carry slurmstepd errors): restarting"
    up=0
  fi
done
if [ "$up" = 1 ] && [ -f "$CONF" ]; then
  say "already running ($BASE): $(idle_nodes)/$NODES nodes idle"
  echo "export SLURM_CONF=$CONF"
  exit 0
fi
if compgen -G "$RUN/*.pid" >/dev/null; then
  say "a partial cluster is left in $BASE; stopping it first"
  DANET_SLURM_BASE=$BASE bash "$HERE/slurm-down.sh" || true
fi

# --- layout and config -----------------------------------------------------------------------------------------
mkdir -p "$BASE"/{etc,state,log,run,munge,spool,fakegpu}
chmod 755 "$BASE" "$BASE/munge"
# A fresh start forgets old jobs: job ids restart at 1 and no stale requeued job comes back to life.
rm -rf "${BASE:?}/state/"* "${BASE:?}/spool/"*
for f in "$LOG"/*.log "$LOG"/*.out; do [ -f "$f" ] && mv -f "$f" "$f.prev"; done
for i in $(seq 1 "$NODES"); do mkdir -p "$BASE/spool/node$i"; done
[ -s "$BASE/munge/munge.key" ] || mungekey --create --keyfile="$BASE/munge/munge.key" >/dev/null
chmod 600 "$BASE/munge/munge.key"

gres_line=""; gres_node=""
rm -f "$BASE/etc/gres.conf"
if [ "$GPUS" -gt 0 ]; then
  # slurmd assigns GPU indices only for real device files; char devices 1,3 (clones of /dev/null) will do.
  for g in $(seq 0 $((GPUS - 1))); do
    [ -c "$BASE/fakegpu/nvidia$g" ] || mknod -m 666 "$BASE/fakegpu/nvidia$g" c 1 3
  done
  gres_line="GresTypes=gpu"; gres_node="Gres=gpu:$GPUS"
  files=$BASE/fakegpu/nvidia0; [ "$GPUS" -gt 1 ] && files="$BASE/fakegpu/nvidia[0-$((GPUS - 1))]"
  echo "NodeName=node[1-$NODES] Name=gpu File=$files" > "$BASE/etc/gres.conf"
fi

cat > "$CONF.tmp" <<EOF
# Generated by danet-orchestrator scripts/slurm-up.sh: a single-host test cluster.
ClusterName=danet
SlurmctldHost=localhost
SlurmctldPort=$PORT
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s): 10 s keeps the
# requeue test short.
AuthInfo=socket=$MSOCK,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# linuxproc + task/none: no cgroups in this container; every process of a job is still tracked and signalled.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# sched_interval=2: a requeued job starts again ~11 s after the requeue, not at the next 60 s pass;
# batch_sched_delay=0: a submitted job starts within about a second.
SchedulerParameters=bf_interval=2,sched_interval=2,batch_sched_delay=0
# The declared CPUs/GPUs are not the machine's: accept them as written.
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Finished jobs stay visible to scontrol show job (orchestrator status/logs) for 10 minutes.
MinJobAge=600
KillWait=5
InactiveLimit=0
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOG/jobcomp.txt
MailProg=/bin/true
$gres_line
NodeName=node[1-$NODES] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$((PORT + 1))-$((PORT + NODES))] CPUs=$CPUS RealMemory=$MEM $gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
mv "$CONF.tmp" "$CONF"

mkdir -p /etc/slurm
if [ -L /etc/slurm/slurm.conf ] || [ ! -e /etc/slurm/slurm.conf ]; then
  ln -sfn "$CONF" /etc/slurm/slurm.conf
else
  say "warning: /etc/slurm/slurm.conf is a real file, left alone; use SLURM_CONF=$CONF"
fi
# node1..nodeN must resolve to this machine (MASTER_ADDR is the first host of the job's nodelist).
hosts_tmp=$(mktemp)
sed '/# BEGIN danet-slurm/,/# END danet-slurm/d' /etc/hosts > "$hosts_tmp"
{ echo "# BEGIN danet-slurm"; echo "127.0.0.1 $(seq -f 'node%g' -s ' ' 1 "$NODES")"; echo "# END danet-slurm"; } >> "$hosts_tmp"
cat "$hosts_tmp" > /etc/hosts   # rewrite in place: /etc/hosts may be a bind mount that cannot be replaced
rm -f "$hosts_tmp"

# --- start the daemons -----------------------------------------------------------------------------------------
# Each runs in the foreground (-F/-D) in a session of its own (setsid): no init system is needed, and
# slurm-down.sh stops each one through the pid file the daemon writes itself.
start() {  # start PIDFILE OUTFILE COMMAND...
  local pidf=$1 out=$2 pid; shift 2
  rm -f "$pidf"
  setsid "$@" >>"$out" 2>&1 </dev/null &
  pid=$!
  for _ in $(seq 1 200); do
    [ -s "$pidf" ] && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  tail -n 15 "$out" >&2 || true
  die "$(basename "$1" .pid) did not start (output: $out)"
}

# The daemons run in the state directory, not the caller's: each job step's slurmstepd inherits slurmd's working
# directory, and a caller's folder (a checkout, a test's tmp) may be deleted while the cluster lives on.
cd "$BASE"
start "$RUN/munged.pid" "$LOG/munged.out" munged -F --socket="$MSOCK" --key-file="$BASE/munge/munge.key" \
  --pid-file="$RUN/munged.pid" --seed-file="$BASE/munge/munged.seed" --log-file="$LOG/munged.log"
for _ in $(seq 1 100); do [ -S "$MSOCK" ] && break; sleep 0.05; done
munge -S "$MSOCK" -n </dev/null | unmunge -S "$MSOCK" >/dev/null 2>&1 || die "munge self-test failed (log: $LOG/munged.log)"

start "$RUN/slurmctld.pid" "$LOG/slurmctld.out" slurmctld -D -f "$CONF"
for i in $(seq 1 "$NODES"); do
  start "$RUN/slurmd-node$i.pid" "$LOG/slurmd-node$i.out" slurmd -D -N "node$i" -f "$CONF"
done

# --- wait until every node is idle (bounded) --------------------------------------------------------------------
deadline=$(( $(date +%s) + TIMEOUT ))
while :; do
  n=$(idle_nodes)
  [ "$n" -ge "$NODES" ] && break
  if [ "$(date +%s)" -ge "$deadline" ]; then
    sinfo -N -l >&2 || true
    tail -n 15 "$LOG/slurmctld.log" >&2 || true
    die "only $n/$NODES nodes idle after ${TIMEOUT}s (logs: $LOG)"
  fi
  sleep 0.2
done
say "up: $NODES nodes x $CPUS CPUs x $GPUS fake GPUs idle, $(( $(date +%s) - t0 )) s (state $BASE)"
echo "export SLURM_CONF=$CONF"
