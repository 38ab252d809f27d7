"""SIGTERM / SIGUSR1 (Slurm's ``--signal``) handling: remember the request, let the loop
checkpoint at the next step boundary and exit cleanly. All ranks agree through an all-reduce,
so they stop at the same step even if the signal reached only some of them."""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class PreemptionHandler:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank received a signal."""
        dev = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=dev)  # NCCL needs CUDA
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
