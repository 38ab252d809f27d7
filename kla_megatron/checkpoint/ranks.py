"""Run a conversion step on N local gloo ranks (the layout a megatron checkpoint is written at),
or in this process when one rank is enough."""
from __future__ import annotations

import os
import socket
import tempfile
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        _destroy_megatron()
        dist.destroy_process_group()


def _destroy_megatron():
    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:
        pass


def run(fn, world_size: int, args=()):
    """``fn(*args)`` on every rank; returns rank 0's result. One rank runs in this process
    (joining an existing 1-rank process group, or creating one)."""
    if world_size == 1:
        owns_group = not dist.is_initialized()
        if owns_group:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
        elif dist.get_world_size() != 1:
            raise RuntimeError("kla_megatron.checkpoint: call conversions from a single process (not inside a job)")
        try:
            return fn(*args)
        finally:
            _destroy_megatron()
            if owns_group:
                dist.destroy_process_group()
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world_size, _free_port(), fn, args, out_dir), nprocs=world_size, join=True)
        except Exception as exc:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise RuntimeError("\n".join(errors) or str(exc)) from None
        return torch.load(os.path.join(out_dir, "0.pt"), weights_only=False)["result"]
