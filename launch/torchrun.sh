#!/usr/bin/env bash
# Start kla_megatron.train on this node with torchrun (c10d rendezvous); run it once per node.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node001 GPUS_PER_NODE=8 \
#     bash launch/torchrun.sh --config configs/1.3b.yaml --set train.steps=1000
#
# Environment (checked before anything starts):
#   NNODES          number of nodes (default 1; 1 = single node, rendezvous on 127.0.0.1)
#   NODE_RANK       this node's index in [0, NNODES) (default: $SLURM_NODEID, else 0)
#   MASTER_ADDR     rendezvous host, reachable from every node (required when NNODES > 1)
#   MASTER_PORT     rendezvous port (default 29500)
#   GPUS_PER_NODE   processes per node (default: GPUs visible to nvidia-smi; required without GPUs)
#   RDZV_ID         rendezvous id shared by all nodes of one job (default: $SLURM_JOB_ID, else kla-<port>)
#   TORCHRUN        the torchrun command (default: "python launch/torchrun_agent.py": torchrun that
#                   passes SIGUSR1 to the workers and exits with their status; see that file)
#   TORCHRUN_ARGS   extra torchrun arguments, e.g. "--numa-binding node" (word-split)
#   DRY_RUN=1       print the command instead of running it
# Every argument is passed to `python -m kla_megatron.train` unchanged.
set -euo pipefail

die() { echo "launch/torchrun.sh: error: $*" >&2; exit 2; }
# check_range NAME VALUE MIN MAX: VALUE is an integer in [MIN, MAX], else a clear error.
check_range() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || [ "$2" -lt "$3" ] || [ "$2" -gt "$4" ]; then
    die "$1 must be an integer in [$3, $4], got '$2'"
  fi
}

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
  [ "$GPUS_PER_NODE" -gt 0 ] || die "GPUS_PER_NODE is not set and nvidia-smi finds no GPU (set it to the number of processes per node)"
fi
check_range NNODES "$NNODES" 1 100000
check_range GPUS_PER_NODE "$GPUS_PER_NODE" 1 1024
check_range NODE_RANK "$NODE_RANK" 0 $((NNODES - 1))
check_range MASTER_PORT "$MASTER_PORT" 1 65535
if [ "$NNODES" -gt 1 ] && [ -z "${MASTER_ADDR:-}" ]; then
  die "MASTER_ADDR is not set: with NNODES=$NNODES every node must be given the same rendezvous host (e.g. the first node's hostname)"
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-kla-$MASTER_PORT}}
[ "$#" -gt 0 ] || die "no training arguments: pass at least --config <run config>"

read -r -a extra <<<"${TORCHRUN_ARGS:-}"
# --shutdown-timeout: on SIGTERM torchrun forwards it and gives the workers this long to write
# their checkpoint before it kills them (newer torchrun; older ones wait 30 s).
if [ -z "${TORCHRUN:-}" ]; then
  torchrun_cmd=(python "$(dirname "${BASH_SOURCE[0]}")/torchrun_agent.py")
  # torchrun_agent.py runs torchrun's own main: read torch/distributed/run.py instead of
  # `--help`, which imports torch (seconds per call)
  help=$(python -c 'import importlib.util as u; print(u.find_spec("torch").submodule_search_locations[0])' 2>/dev/null |
         xargs -r -I{} cat {}/distributed/run.py 2>/dev/null || true)
else
  read -r -a torchrun_cmd <<<"$TORCHRUN"
  help=$("${torchrun_cmd[@]}" --help 2>/dev/null || true)
fi
if [[ $help == *--shutdown-timeout* ]]; then
  extra+=(--shutdown-timeout "${SHUTDOWN_TIMEOUT:-600}")
fi

cmd=("${torchrun_cmd[@]}" --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" --node-rank "$NODE_RANK"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID"
     --max-restarts 0 "${extra[@]}" -m kla_megatron.train "$@")
echo "[torchrun.sh] node $NODE_RANK/$NNODES on $(hostname -s): ${cmd[*]}" >&2
if [ "${DRY_RUN:-0}" = 1 ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
