"""Run a test body on N CPU ranks with gloo and collect what each rank returns.

Usage::

    def body(rank, world_size, x):          # module-level (pickled by spawn)
        ...
        return some_tensor_or_picklable

    results = run_on_ranks(body, world_size=2, args=(x,))   # list indexed by rank

Exceptions on any rank fail the calling test with that rank's traceback.
"""
from __future__ import annotations

from kla_megatron.parallel.local_ranks import free_port, spawn_gloo

__all__ = ["free_port", "run_on_ranks"]


def run_on_ranks(fn, world_size: int = 2, args=()):
    try:
        return spawn_gloo(fn, world_size, args, pass_rank=True)
    except RuntimeError as exc:
        raise AssertionError(str(exc)) from None
