"""kla_megatron.parallel.local_ranks: results come back per rank, failures carry the traceback."""
import os
import pytest
import torch
import torch.distributed as dist

from kla_megatron.parallel.local_ranks import spawn_gloo


def _sum_ranks(rank, world_size, offset):
    t = torch.tensor([float(rank + offset)])
    dist.all_reduce(t)
    return rank, t.item()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    return rank


def test_results_per_rank():
    assert spawn_gloo(_sum_ranks, 2, (10,), pass_rank=True) == [(0, 21.0), (1, 21.0)]


def test_failure_reports_the_failing_rank_traceback():
    with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank one is broken"):
        spawn_gloo(_fail_on_rank_one, 2, pass_rank=True)


def _visible_gpus(rank, world_size):
    import torch

    return os.environ.get("CUDA_VISIBLE_DEVICES"), torch.cuda.device_count()


def test_ranks_see_no_gpu_and_this_process_keeps_its_setting(monkeypatch):
    """The ranks run on the CPU on a GPU node too (megatron over gloo on CUDA tensors crashed);
    the caller's CUDA_VISIBLE_DEVICES, set or not, is left as it was."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert spawn_gloo(_visible_gpus, 2, pass_rank=True) == [("", 0), ("", 0)]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    spawn_gloo(_visible_gpus, 1, pass_rank=True)
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def _where(*_):
    return os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")


def test_conversion_runs_one_rank_here_on_cpu_and_spawned_without_gpus_on_a_gpu_node(monkeypatch):
    """checkpoint/ranks.run: in this process on a CPU machine; with CUDA, a spawned rank that sees
    no GPU (in this process megatron would build the model on the GPU, the inputs on the CPU)."""
    from kla_megatron.checkpoint import ranks

    assert ranks.run(_where, 1)[0] == os.getpid()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pid, visible = ranks.run(_where, 1)
    assert pid != os.getpid() and visible == ""
