"""torchrun, except that SIGUSR1 goes to the workers and leaves the agent running.

SIGUSR1 means "checkpoint and exit" (Slurm's ``--signal`` before a time limit; the trainer
handles it). torchrun's agent would die of it (the default action) or, told to handle it
(``--signals-to-handle``), forward it and then exit 1 whatever the workers did; one node's
exit 1 makes ``srun --kill-on-bad-exit`` kill the other nodes while they are still
checkpointing. Here the agent passes the signal to its children (the workers, which run in
sessions of their own) and carries on; once they have checkpointed and exited 0 it exits 0.
Every other signal, and every argument, is torchrun's.

    python launch/torchrun_agent.py --nnodes 2 --nproc-per-node 8 ... -m kla_megatron.train ...
"""
from __future__ import annotations

import glob
import os
import signal
import sys

from torch.distributed.run import main


def _workers() -> list[int]:
    pids = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        with open(path) as f:
            pids += map(int, f.read().split())
    return pids


def _forward(signum, frame) -> None:
    workers = _workers()
    # os.write: a signal handler must not re-enter a buffered stream that may be mid-write
    os.write(2, f"[torchrun_agent] SIGUSR1: forwarding it to the workers {workers or '(none yet)'}\n".encode())
    for pid in workers:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # exited meanwhile
            pass


if __name__ == "__main__":
    signal.signal(signal.SIGUSR1, _forward)
    sys.exit(main())
