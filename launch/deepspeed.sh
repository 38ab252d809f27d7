#!/usr/bin/env bash
# Start kla_megatron.train with the DeepSpeed launcher (for configs with `engine: deepspeed`).
#
#   HOSTFILE=hosts.txt bash launch/deepspeed.sh --config configs/tiny_cpu_deepspeed.yaml
#
# hosts.txt has one '<host> slots=<processes>' line per node. By default the launcher starts the
# other nodes over ssh (pdsh); set NODE_RANK to run it on each node yourself instead (--no_ssh,
# like torchrun.sh), e.g. on clusters without passwordless ssh.
#
# Environment (checked before anything starts):
#   HOSTFILE        hostfile (required when NUM_NODES > 1; default: none = this machine only)
#   NUM_NODES       nodes to use (default: the hostfile's host count, else 1)
#   GPUS_PER_NODE   processes per node (default: the hostfile's slots, else nvidia-smi's count)
#   MASTER_ADDR     rendezvous host (default: 127.0.0.1 on one node; required with NODE_RANK)
#   MASTER_PORT     rendezvous port (default 29500)
#   NODE_RANK       this node's index: launch each node separately, without ssh
#   DS_ACCELERATOR  'cpu' on machines without GPUs (then gloo and DeepSpeed's CPU comm op)
#   DEEPSPEED       the launcher command (default: deepspeed)
#   DRY_RUN=1       print the command instead of running it
# Every argument is passed to `python -m kla_megatron.train` unchanged.
set -euo pipefail

die() { echo "launch/deepspeed.sh: error: $*" >&2; exit 2; }
check_range() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || [ "$2" -lt "$3" ] || [ "$2" -gt "$4" ]; then
    die "$1 must be an integer in [$3, $4], got '$2'"
  fi
}
[ "$#" -gt 0 ] || die "no training arguments: pass at least --config <run config>"

hosts=0 slots=""
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || die "HOSTFILE=$HOSTFILE does not exist"
  while read -r host slot rest; do
    [[ -z $host || $host == \#* ]] && continue
    [[ $slot =~ ^slots=[0-9]+$ && -z $rest ]] || die "$HOSTFILE: expected '<host> slots=<n>', got '$host $slot $rest'"
    hosts=$((hosts + 1)); slots=${slot#slots=}
  done <"$HOSTFILE"
  [ "$hosts" -gt 0 ] || die "HOSTFILE=$HOSTFILE lists no hosts"
fi
NUM_NODES=${NUM_NODES:-$((hosts > 0 ? hosts : 1))}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=${slots:-$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)}
  [ "${GPUS_PER_NODE:-0}" -gt 0 ] || die "GPUS_PER_NODE is not set, the hostfile gives no slots and nvidia-smi finds no GPU"
fi
MASTER_PORT=${MASTER_PORT:-29500}
check_range NUM_NODES "$NUM_NODES" 1 100000
check_range GPUS_PER_NODE "$GPUS_PER_NODE" 1 1024
check_range MASTER_PORT "$MASTER_PORT" 1 65535
if [ "$NUM_NODES" -gt 1 ] && [ -z "${HOSTFILE:-}" ]; then die "NUM_NODES=$NUM_NODES needs a HOSTFILE"; fi
if [ "$hosts" -gt 0 ] && [ "$NUM_NODES" -gt "$hosts" ]; then die "NUM_NODES=$NUM_NODES but $HOSTFILE lists $hosts hosts"; fi

read -r -a cmd <<<"${DEEPSPEED:-deepspeed}"
if [ -n "${HOSTFILE:-}" ]; then cmd+=(--hostfile "$HOSTFILE"); fi
cmd+=(--num_nodes "$NUM_NODES" --num_gpus "$GPUS_PER_NODE" --master_port "$MASTER_PORT")
if [ -n "${NODE_RANK:-}" ]; then
  check_range NODE_RANK "$NODE_RANK" 0 $((NUM_NODES - 1))
  [ -n "${MASTER_ADDR:-}" ] || die "NODE_RANK is set (launch without ssh) but MASTER_ADDR is not: give every node the first node's address"
  cmd+=(--no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
elif [ "$NUM_NODES" -eq 1 ]; then
  # One node: no ssh to ourselves (the launcher's ssh check and its `hostname -I` lookup of the
  # master address both need ssh), loopback rendezvous.
  cmd+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
elif [ -n "${MASTER_ADDR:-}" ]; then
  cmd+=(--master_addr "$MASTER_ADDR")
fi
# --no_local_rank: our trainer reads LOCAL_RANK from the environment, not a --local_rank flag.
cmd+=(--no_local_rank --module kla_megatron.train "$@")
echo "[deepspeed.sh] ${DS_ACCELERATOR:+DS_ACCELERATOR=$DS_ACCELERATOR }${cmd[*]}" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
