"""Run a test body on N CPU ranks with gloo and collect what each rank returns.

Usage::

    def body(rank, world_size, x):          # module-level (pickled by spawn)
        ...
        return some_tensor_or_picklable

    results = run_on_ranks(body, world_size=2, args=(x,))   # list indexed by rank

Exceptions on any rank fail the calling test with that rank's traceback.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, out_dir):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        # Only if the body used megatron: importing it just to clean up costs seconds per rank.
        if "megatron.core.parallel_state" in sys.modules:
            try:
                sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
            except Exception:
                pass
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int = 2, args=()):
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world_size, free_port(), fn, args, out_dir), nprocs=world_size, join=True)
        except Exception as exc:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise AssertionError("\n".join(errors) or str(exc)) from None
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)["result"] for r in range(world_size)]
