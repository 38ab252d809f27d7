"""Run a conversion step on N local gloo ranks (the layout a megatron checkpoint is written at),
or in this process when one rank is enough. Conversion always runs on the CPU: on a GPU node
even one rank is spawned, with the GPUs hidden (parallel/local_ranks.py), since megatron would
build the model on the GPU in this process."""
from __future__ import annotations

import torch
import torch.distributed as dist

from kla_megatron.parallel.local_ranks import destroy_model_parallel, free_port, spawn_gloo


def run(fn, world_size: int, args=()):
    """``fn(*args)`` on every rank; returns rank 0's result. One rank on a CPU-only machine runs
    in this process (joining an existing 1-rank process group, or creating one)."""
    if world_size > 1 or torch.cuda.is_available():
        return spawn_gloo(fn, world_size, args)[0]
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    elif dist.get_world_size() != 1:
        raise RuntimeError("kla_megatron.checkpoint: call conversions from a single process (not inside a job)")
    try:
        return fn(*args)
    finally:
        destroy_model_parallel()
        if owns_group:
            dist.destroy_process_group()
