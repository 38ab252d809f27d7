"""The launchers for real on CPU/gloo: launch/torchrun.sh as two "nodes" (two rendezvous agents
on 127.0.0.1) and launch/deepspeed.sh with a `localhost slots=2` hostfile, each training the tiny
model for a few steps."""
import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kla_megatron.parallel.local_ranks import free_port
from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

def tiny_train_args(tmp_path, config="tiny_cpu.yaml", steps=3, *extra):
    model = write_tiny_model(tmp_path / "tiny_model.yaml", num_layers=2, layer_pattern="K-")
    sets = [f"model={model}", "data.kind=mock", f"checkpoint.dir={tmp_path / 'ck'}", f"train.steps={steps}",
            "train.warmup_steps=1", "train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4",
            "train.eval_interval=0", "logging.interval=1", "checkpoint.save_interval=0", *extra]
    return ["--config", str(REPO / "configs" / config)] + [a for s in sets for a in ("--set", s)]


def cpu_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NODE_RANK", "NNODES", "MASTER_"))}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def step_lines(text: str) -> dict[int, float]:
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step (\d+)/\d+ \| loss ([0-9.]+)", text, re.M)}


@contextlib.contextmanager
def two_nodes(tmp_path, steps):
    """Two torchrun.sh "nodes" on 127.0.0.1 training the tiny model; yields their Popen objects and
    kills whatever is still running on the way out. Node i logs to node<i>.log."""
    port, procs = free_port(), []
    try:
        for node_rank in (0, 1):
            env = cpu_env(NNODES="2", NODE_RANK=str(node_rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          GPUS_PER_NODE="1", RDZV_ID=f"test-{port}")
            with open(tmp_path / f"node{node_rank}.log", "w") as log:
                procs.append(subprocess.Popen(["bash", str(REPO / "launch/torchrun.sh"),
                                               *tiny_train_args(tmp_path, steps=steps)],
                                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO))
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def node_log(tmp_path, i) -> str:
    return (tmp_path / f"node{i}.log").read_text()


def test_torchrun_two_nodes_on_one_machine_trains(tmp_path):
    with two_nodes(tmp_path, 3) as procs:
        codes = [p.wait(timeout=600) for p in procs]
    text = node_log(tmp_path, 0) + node_log(tmp_path, 1)
    assert codes == [0, 0], text[-3000:]
    assert "--nnodes 2 --nproc-per-node 1 --node-rank 1 --rdzv-backend c10d" in text
    losses = step_lines(text)
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1], text[-3000:]
    assert (tmp_path / "ck" / "iter_0000003" / "manifest.json").exists()


def test_sigusr1_to_one_node_checkpoints_every_node_and_exits_0(tmp_path):
    """SIGUSR1 to one node's torchrun.sh (what srun forwards near a time limit) reaches that node's
    workers, every rank stops at the same step, the checkpoint is written, and both nodes exit 0:
    an exit 1 from either would make srun --kill-on-bad-exit kill the other mid-checkpoint."""
    steps = 500
    logged_step_2 = lambda i: re.search(r"^step 2/", node_log(tmp_path, i), re.M)  # noqa: E731
    with two_nodes(tmp_path, steps) as procs:
        t0 = time.time()
        while not (logged_step_2(0) or logged_step_2(1)):
            assert all(p.poll() is None for p in procs) and time.time() - t0 < 600, (
                node_log(tmp_path, 0)[-3000:] + node_log(tmp_path, 1)[-3000:])
            time.sleep(0.2)
        # c10d rendezvous places rank 0 (the one that logs) on either node: signal the other one
        quiet = 0 if logged_step_2(1) else 1
        procs[quiet].send_signal(signal.SIGUSR1)
        codes = [p.wait(timeout=600) for p in procs]
    text = node_log(tmp_path, 0) + node_log(tmp_path, 1)
    assert codes == [0, 0], text[-4000:]
    assert "SIGUSR1: forwarding it to the workers" in node_log(tmp_path, quiet)
    stop = int(re.search(r"received signal \(on another rank\): checkpointing at step (\d+) and exiting", text)[1])
    assert 2 <= stop < steps and max(step_lines(text)) == stop
    assert (tmp_path / "ck" / f"iter_{stop:07d}" / "manifest.json").exists()


@pytest.mark.slow
def test_deepspeed_launcher_with_a_localhost_hostfile_trains(tmp_path):
    pytest.importorskip("deepspeed")
    hosts = tmp_path / "hostfile"
    hosts.write_text("localhost slots=2\n")
    env = cpu_env(HOSTFILE=str(hosts), MASTER_PORT=str(free_port()), DS_ACCELERATOR="cpu")
    r = subprocess.run(["bash", str(REPO / "launch/deepspeed.sh"),
                        *tiny_train_args(tmp_path, "tiny_cpu_deepspeed.yaml", 3, "train.nan_policy=abort")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    assert "dist_world_size=2" in text
    losses = step_lines(text)
    assert sorted(losses) == [1, 2, 3] and losses[3] < losses[1], text[-3000:]
    assert (tmp_path / "ck" / "iter_0000003" / "manifest.json").exists()
