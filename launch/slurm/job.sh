#!/usr/bin/env bash
# The body of every sbatch template: runs in the batch shell on the job's first node.
# One srun task per node, each running launch/torchrun.sh, all rendezvousing at the first node.
#
# Preemption and time limits: submit with `--signal=B:USR1@<seconds>` (the templates do). Slurm then
# signals this shell <seconds> before the end; the trap forwards SIGUSR1 to the training processes
# (through srun and launch/torchrun_agent.py), the trainer writes a checkpoint at the next step
# boundary and exits, and this script requeues the job (`scontrol requeue`), which resumes from that
# checkpoint (checkpoint.resume: auto). The trainer exits 0 when preempted, so the trap, not the
# exit code, says whether to requeue. SIGTERM (scancel, or preemption with PreemptMode=REQUEUE) is
# also caught; Slurm has already signalled the steps then.
#
# Environment (pass with `sbatch --export=ALL,NAME=value`):
#   GPUS_PER_NODE   processes per node (default: $SLURM_GPUS_ON_NODE, else nvidia-smi's count)
#   KLA_REPO        repository root (default: $SLURM_SUBMIT_DIR, i.e. submit from the repo root)
#   KLA_CLUSTER_ENV per-cluster environment file (default: launch/slurm/env/default.env)
#   KLA_LOG_DIR     log root (default: logs); see "Log layout" in launch/README.md
#   KLA_REQUEUE     1 (default) requeue after a signal; 0 when chained with --dependency=afterany
#   KLA_CPU_BIND    srun --cpu-bind value (default: unset = the cluster's default; e.g. cores, socket)
#   KLA_MEM_BIND    srun --mem-bind value (default: unset; e.g. local)
#   MASTER_PORT     rendezvous port (default: 20000 + job id % 10000)
#   DRY_RUN=1       print the commands instead of running them (works outside Slurm too)
# Arguments are passed to `python -m kla_megatron.train` (e.g. --config configs/125m.yaml --set ...).
set -euo pipefail

log() { echo "[job.sh $(date +%T)] $*" >&2; }
die() { echo "launch/slurm/job.sh: error: $*" >&2; exit 2; }
DRY_RUN=${DRY_RUN:-0}

if [ -z "${SLURM_JOB_ID:-}" ]; then
  [ "$DRY_RUN" = 1 ] || die "not inside a Slurm job: submit with sbatch, or set DRY_RUN=1 to print the commands"
  # dry run outside an allocation: a stand-in allocation so the commands can be shown
  SLURM_JOB_ID=DRYRUN SLURM_JOB_NAME=${SLURM_JOB_NAME:-kla} SLURM_NNODES=${SLURM_NNODES:-2}
  SLURM_JOB_NODELIST="node[001-$(printf '%03d' "$SLURM_NNODES")]"
  SLURM_SUBMIT_DIR=$PWD
fi
KLA_REPO=${KLA_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$KLA_REPO/launch/torchrun.sh" ] || die "KLA_REPO=$KLA_REPO has no launch/torchrun.sh: submit from the repository root or set KLA_REPO"
cd "$KLA_REPO"

KLA_CLUSTER_ENV=${KLA_CLUSTER_ENV:-launch/slurm/env/default.env}
[ -f "$KLA_CLUSTER_ENV" ] || die "cluster environment file '$KLA_CLUSTER_ENV' does not exist (see launch/slurm/env/)"
# shellcheck disable=SC1090  # a per-cluster file chosen at run time
source "$KLA_CLUSTER_ENV"

if [ "$SLURM_JOB_ID" = DRYRUN ]; then
  mapfile -t HOSTS < <(for i in $(seq 1 "$SLURM_NNODES"); do printf 'node%03d\n' "$i"; done)
else
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
[ "${#HOSTS[@]}" -eq "$SLURM_NNODES" ] || die "scontrol gave ${#HOSTS[@]} hostnames for $SLURM_NNODES nodes"
export NNODES=$SLURM_NNODES MASTER_ADDR=${HOSTS[0]}
if [ "$SLURM_JOB_ID" = DRYRUN ]; then MASTER_PORT=${MASTER_PORT:-29500}; fi
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
export RDZV_ID=$SLURM_JOB_ID
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
[ -n "$GPUS_PER_NODE" ] || die "GPUS_PER_NODE is not set and the job has no GPUs (--gpus-per-node): set it with --export=ALL,GPUS_PER_NODE=N"

# Log layout: <log dir>/<job name>/<job id>/attempt-<restart count>/node-<node index>.log,
# next to the batch log that the templates' sbatch --output writes (logs/<job name>-<job id>.out;
# Slurm does not create that folder: `mkdir -p logs` before sbatch).
ATTEMPT=${SLURM_RESTART_COUNT:-0}
LOG_DIR=${KLA_LOG_DIR:-logs}/$SLURM_JOB_NAME/$SLURM_JOB_ID/attempt-$ATTEMPT
log "job $SLURM_JOB_ID attempt $ATTEMPT: ${#HOSTS[@]} node(s) ${HOSTS[*]}, $GPUS_PER_NODE process(es) each," \
    "rendezvous $MASTER_ADDR:$MASTER_PORT, logs $LOG_DIR"

srun_cmd=(srun --nodes "$NNODES" --ntasks "$NNODES" --ntasks-per-node 1 --kill-on-bad-exit=1
          --output "$LOG_DIR/node-%t.log")
if [ -n "${KLA_CPU_BIND:-}" ]; then srun_cmd+=(--cpu-bind "$KLA_CPU_BIND"); fi
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then srun_cmd+=(--cpus-per-task "$SLURM_CPUS_PER_TASK"); fi
if [ -n "${KLA_MEM_BIND:-}" ]; then srun_cmd+=(--mem-bind "$KLA_MEM_BIND"); fi
# NODE_RANK is not exported here: torchrun.sh takes it from each task's own $SLURM_NODEID.
srun_cmd+=(bash launch/torchrun.sh "$@")

if [ "$DRY_RUN" = 1 ]; then
  echo "# env: NNODES=$NNODES MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT GPUS_PER_NODE=$GPUS_PER_NODE RDZV_ID=$RDZV_ID"
  printf '%q ' "${srun_cmd[@]}"; echo
  for i in "${!HOSTS[@]}"; do
    echo "# on ${HOSTS[$i]} (SLURM_NODEID=$i):"
    SLURM_NODEID=$i DRY_RUN=1 bash launch/torchrun.sh "$@" 2>/dev/null
  done
  exit 0
fi

mkdir -p "$LOG_DIR"
SIGNALLED=""
# shellcheck disable=SC2317  # called by the traps below
on_signal() {
  SIGNALLED=$1
  log "received SIG$1: asking the trainer to checkpoint and exit"
  # srun forwards the signal to every task; the trainer all-reduces the stop flag across ranks.
  if [ "$1" = USR1 ] && [ -n "${SRUN_PID:-}" ]; then kill -USR1 "$SRUN_PID" 2>/dev/null || true; fi
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

"${srun_cmd[@]}" &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives: keep waiting until srun itself has ended.
rc=0
while :; do
  wait "$SRUN_PID" && rc=0 || rc=$?
  kill -0 "$SRUN_PID" 2>/dev/null || break
done
log "srun exited with $rc"

if [ -n "$SIGNALLED" ] && [ "${KLA_REQUEUE:-1}" = 1 ]; then
  log "requeueing job $SLURM_JOB_ID (it resumes from the checkpoint just written)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
