"""Run a function on N local processes joined by a gloo process group.

Used where a job must act at a given parallel layout without a launcher: offline checkpoint
conversion (a megatron checkpoint is written at its TP/PP layout) and the multi-rank CPU tests.
Each rank's return value (or traceback) travels back through a temporary file. The ranks run
on the CPU even on a GPU node: megatron-core's collectives on CUDA tensors need NCCL, and over
gloo they crashed the rank (SIGSEGV), so the ranks are started with no GPU visible.
"""
from __future__ import annotations

import contextlib
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


def destroy_model_parallel() -> None:
    # Only if megatron was used: importing it just to clean up costs seconds per rank.
    if "megatron.core.parallel_state" in sys.modules:
        try:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        except Exception:
            pass


def _entry(rank, world_size, port, fn, args, pass_rank, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args) if pass_rank else fn(*args)
        torch.save({"ok": True, "result": result}, os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, os.path.join(out_dir, f"{rank}.pt"))
        raise
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()


@contextlib.contextmanager
def _no_visible_gpus():
    """Spawned children inherit the environment: hide the GPUs from them, not from this process."""
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["CUDA_VISIBLE_DEVICES"]
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved


def spawn_gloo(fn, world_size: int, args=(), *, pass_rank: bool = False) -> list:
    """``fn(*args)`` (or ``fn(rank, world_size, *args)``) on ``world_size`` spawned ranks;
    returns every rank's result. A failure on any rank raises RuntimeError carrying the
    failing ranks' tracebacks. ``fn`` must be importable (spawn pickles it)."""
    with tempfile.TemporaryDirectory() as out_dir, _no_visible_gpus():
        try:
            mp.spawn(_entry, args=(world_size, free_port(), fn, args, pass_rank, out_dir),
                     nprocs=world_size, join=True)
        except Exception as exc:
            errors = []
            for r in range(world_size):
                path = os.path.join(out_dir, f"{r}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"rank {r}:\n{rec['error']}")
            raise RuntimeError("\n".join(errors) or str(exc)) from None
        return [torch.load(os.path.join(out_dir, f"{r}.pt"), weights_only=False)["result"] for r in range(world_size)]
