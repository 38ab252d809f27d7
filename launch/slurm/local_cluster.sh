#!/usr/bin/env bash
# A Slurm "cluster" on this one machine, for tests and for trying the templates: munged,
# slurmctld and N slurmd daemons (Debian's slurm-wlm emulates N nodes on one host), no systemd,
# no cgroups, all state under $KLA_SLURM_DIR.
#
#   eval "$(bash launch/slurm/local_cluster.sh up)"   # prints `export SLURM_CONF=...`
#   sbatch ...; squeue; ...
#   bash launch/slurm/local_cluster.sh down            # stops the daemons by pid, removes the state
#
# Environment:
#   KLA_SLURM_DIR      state/config folder (default ${TMPDIR:-/tmp}/kla-slurm)
#   KLA_SLURM_NODES    emulated nodes, named klanode1..N and added to /etc/hosts as 127.0.0.1 (2)
#   KLA_SLURM_CPUS     CPUs per node (default: nproc; nodes share them)
#   KLA_SLURM_PORT     slurmctld port; slurmd i listens on PORT+i (default 17817)
#   KLA_SLURM_INSTALL  1: apt-get install slurm-wlm munge when missing (default 1)
set -euo pipefail

BASE=${KLA_SLURM_DIR:-${TMPDIR:-/tmp}/kla-slurm}
NODES=${KLA_SLURM_NODES:-2}
CPUS=${KLA_SLURM_CPUS:-$(nproc)}
PORT=${KLA_SLURM_PORT:-17817}
TAG="# kla-local-cluster"
log() { echo "[local_cluster] $*" >&2; }

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {
  local pf=$1 pid
  [ -f "$pf" ] || return 0
  pid=$(cat "$pf")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; fi
  fi
  rm -f "$pf"
}

down() {
  export SLURM_CONF=$BASE/etc/slurm.conf
  if running "$BASE/run/slurmctld.pid"; then scancel --quiet --user="$(id -un)" 2>/dev/null || true; sleep 0.5; fi
  for pf in "$BASE"/run/slurmd-*.pid; do [ -e "$pf" ] && stop_pidfile "$pf"; done
  stop_pidfile "$BASE/run/slurmctld.pid"
  stop_pidfile "$BASE/munge/munged.pid"
  sed -i "/$TAG\$/d" /etc/hosts
  rm -rf "$BASE"
  log "stopped; removed $BASE"
}

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then return 0; fi
  [ "${KLA_SLURM_INSTALL:-1}" = 1 ] || { log "slurm-wlm/munge are not installed"; exit 3; }
  log "installing slurm-wlm and munge with apt-get (~30 s)"
  # no systemd here: the postinst's "policy-rc.d denied execution of start" is expected
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null ||
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; } ||
    { log "apt-get install slurm-wlm munge failed"; exit 3; }
}

start_munge() {
  # munged insists on: a 0400 key owned by its user, a world-executable socket folder that is not
  # group/other-writable. Run it as user munge on a private socket so a system munged is untouched.
  local dir=$BASE/munge priv=$BASE/munge/private
  mkdir -p "$priv"
  [ -s "$priv/munge.key" ] || dd if=/dev/urandom of="$priv/munge.key" bs=1024 count=1 status=none
  chown -R munge:munge "$dir"; chmod 755 "$dir"; chmod 700 "$priv"; chmod 400 "$priv/munge.key"
  if ! running "$dir/munged.pid"; then
    rm -f "$dir/munge.socket" "$dir/munge.socket.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$dir/munge.socket" --key-file="$priv/munge.key" \
      --log-file="$priv/munged.log" --pid-file="$dir/munged.pid" --seed-file="$priv/munged.seed"
  fi
  for _ in $(seq 50); do [ -S "$dir/munge.socket" ] && break; sleep 0.1; done
  munge -n -S "$dir/munge.socket" | unmunge -S "$dir/munge.socket" >/dev/null || { log "munge self-test failed"; exit 1; }
}

write_conf() {
  local last=$((PORT + NODES))
  # SlurmctldHost must be this machine's short hostname (22.05 rejects any other name).
  cat >"$BASE/etc/slurm.conf" <<CONF
ClusterName=klalocal
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$BASE/munge/munge.socket
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/slurmd-%n
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
InactiveLimit=0
MinJobAge=300
KillWait=10
Waittime=0
JobRequeue=1
NodeName=klanode[1-$NODES] NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) Port=[$((PORT + 1))-$last] CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=klanode[1-$NODES] Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  # no cgroup.conf: 22.05's default CgroupPlugin=autodetect initialises and then stays unused
}

up() {
  install_if_missing
  mkdir -p "$BASE"/{etc,state,spool,log,run}
  chmod 755 "$BASE" "$BASE"/{etc,state,spool,log,run}
  start_munge
  for i in $(seq 1 "$NODES"); do
    getent hosts "klanode$i" >/dev/null || echo "127.0.0.1 klanode$i  $TAG" >>/etc/hosts
  done
  write_conf
  export SLURM_CONF=$BASE/etc/slurm.conf
  running "$BASE/run/slurmctld.pid" || /usr/sbin/slurmctld -f "$SLURM_CONF" -c
  for i in $(seq 1 "$NODES"); do
    mkdir -p "$BASE/spool/slurmd-klanode$i"  # slurmd does not create its spool folder
    running "$BASE/run/slurmd-klanode$i.pid" || /usr/sbin/slurmd -f "$SLURM_CONF" -N "klanode$i"
  done
  for _ in $(seq 300); do
    idle=$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)$' || true)
    [ "$idle" -ge "$NODES" ] && { log "up: $NODES node(s) klanode[1-$NODES]"; echo "export SLURM_CONF=$SLURM_CONF"; return 0; }
    sleep 0.1
  done
  log "nodes did not become idle"; sinfo -N >&2 || true; tail -n 20 "$BASE"/log/*.log >&2 || true
  exit 1
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
