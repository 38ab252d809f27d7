"""The sbatch templates on a real (local) Slurm cluster: 2 emulated nodes started by
launch/slurm/local_cluster.sh (Debian slurm-wlm + munge, installed with apt-get if missing).

- multi_node.sbatch trains the tiny model for a few steps over 2 nodes and exits 0;
- preemption: SIGUSR1 to the batch shell (what `--signal=B:USR1@s` does before the time limit)
  -> the trainer checkpoints and exits -> job.sh requeues -> the job resumes from the checkpoint;
- preprocess_array.sbatch tokenizes shards on a job array and a dependent job merges them.
Skipped, with the reason, when the cluster cannot be set up (not root, no apt, no packages)."""
import fcntl
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.test_launch_run import REPO, step_lines, tiny_train_args

SLURM_PORT = "18817"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (munge user, /etc/hosts entries, apt-get)")
    # One cluster at a time on this machine (fixed ports, /etc/hosts names): pytest-xdist may
    # run this module's tests on two workers, each with its own module fixture.
    with open("/tmp/kla-slurm-test.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _cluster()


def _cluster():
    # not under pytest's 0700 tmp folder: munged runs as user munge and must reach its files
    base = tempfile.mkdtemp(prefix="kla-slurm-test-", dir="/tmp")
    os.chmod(base, 0o755)
    env = {**os.environ, "KLA_SLURM_DIR": base, "KLA_SLURM_NODES": "2", "KLA_SLURM_PORT": SLURM_PORT}
    script = str(REPO / "launch/slurm/local_cluster.sh")
    r = subprocess.run(["bash", script, "up"], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        subprocess.run(["bash", script, "down"], capture_output=True, env=env, timeout=120)
        pytest.skip(f"could not start a local Slurm cluster (slurm-wlm/munge via apt-get): {r.stderr.strip()[-500:]}")
    env["SLURM_CONF"] = re.search(r"export SLURM_CONF=(\S+)", r.stdout)[1]
    try:
        yield env
    finally:
        subprocess.run(["bash", script, "down"], capture_output=True, env=env, timeout=120)


def job_info(env, jid) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], capture_output=True, text=True, env=env).stdout
    return dict(re.findall(r"(JobState|Restarts|ExitCode)=(\S+)", out))


def node_states(env) -> list:
    return subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env).stdout.split()


def poll(probe, done, timeout, what):
    """``probe()`` every 0.5 s until ``done`` holds for its value (returned); fails after ``timeout`` s."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = probe()
        if done(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} still {probe()} after {timeout}s")


def wait_for(env, jid, done, timeout=600):
    return poll(lambda: job_info(env, jid), done, timeout, f"job {jid}")


def submit(env, tmp_path, steps, *extra):
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    export = f"ALL,GPUS_PER_NODE=1,KLA_CLUSTER_ENV=launch/slurm/env/cpu_local.env,KLA_LOG_DIR={logs}"
    cmd = ["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=0", "--cpus-per-task=1", "--time=00:15:00",
           f"--output={logs}/%x-%j.out", f"--export={export}", "launch/slurm/multi_node.sbatch",
           *tiny_train_args(tmp_path, "tiny_cpu.yaml", steps, *extra)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0], logs


def cluster_logs(env, jid) -> str:
    """The job's record and the daemons' log lines about it: why Slurm failed or requeued it."""
    job = subprocess.run(["scontrol", "show", "job", jid], capture_output=True, text=True, env=env).stdout
    lines = []
    for log in sorted(Path(env["KLA_SLURM_DIR"], "log").glob("*.log")):
        lines += [f"{log.name}: {line}" for line in log.read_text(errors="replace").splitlines()
                  if re.search(rf"(JobId|job|StepId)[= ]?{jid}\b", line, re.I)]
    return job + "\n".join(lines[-60:])


def node_logs(logs, jid, attempt) -> str:
    return "".join(p.read_text() for p in sorted((logs / "kla-pretrain" / jid / f"attempt-{attempt}").glob("node-*.log")))


def test_sbatch_multi_node_template_trains_and_exits_0(slurm, tmp_path):
    jid, logs = submit(slurm, tmp_path, 3)
    info = wait_for(slurm, jid, lambda i: i.get("JobState") not in (None, "PENDING", "RUNNING", "CONFIGURING",
                                                                   "COMPLETING"))
    batch = (logs / f"kla-pretrain-{jid}.out").read_text()
    text = node_logs(logs, jid, 0)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", batch + text[-3000:]
    assert "2 node(s) klanode1 klanode2, 1 process(es) each, rendezvous klanode1:" in batch
    assert sorted(step_lines(text)) == [1, 2, 3], text[-3000:]
    assert (tmp_path / "ck" / "iter_0000003" / "manifest.json").exists()


@pytest.mark.slow
def test_preemption_signal_checkpoints_requeues_and_resumes(slurm, tmp_path):
    steps = 60
    jid, logs = submit(slurm, tmp_path, steps)
    t0 = time.time()
    while not re.search(r"^step 2/", node_logs(logs, jid, 0), re.M):
        assert job_info(slurm, jid).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), node_logs(logs, jid, 0)
        assert time.time() - t0 < 600, "training did not start"
        time.sleep(0.5)
    # what --signal=B:USR1@<s> does near the time limit: SIGUSR1 to the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", jid], check=True, env=slurm)
    wait_for(slurm, jid, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING")
    # Slurm holds a requeued job for ~2 minutes (its begin time). Release it sooner, but only once
    # both nodes are idle and a few seconds have passed: slurmd refuses a relaunch whose credential
    # is from the same second as the old one's revocation ("Job credential revoked": FAILED).
    poll(lambda: node_states(slurm), lambda states: states == ["idle", "idle"], 120, "nodes")
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"JobId={jid}", "StartTime=now"], check=True, env=slurm)
    info = wait_for(slurm, jid, lambda i: i.get("JobState") not in ("PENDING", "RUNNING", "CONFIGURING",
                                                                   "COMPLETING", "REQUEUED"))
    batch = (logs / f"kla-pretrain-{jid}.out").read_text()
    first, second = node_logs(logs, jid, 0), node_logs(logs, jid, 1)
    # On failure show the trainer's logs and Slurm's own account of the job.
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"{batch}\n--- attempt 0 ---\n{first[-4000:]}\n--- attempt 1 ---\n{second[-4000:]}\n"
        f"--- slurm ---\n{cluster_logs(slurm, jid)}")
    assert "received SIGUSR1" in batch and f"requeueing job {jid}" in batch, batch
    # every node checkpointed and exited 0: none was killed by srun --kill-on-bad-exit
    assert batch.count("srun exited with 0") == 2 and "Terminated" not in batch, batch
    stop = int(re.search(r"checkpointing at step (\d+) and exiting", first)[1])
    assert 2 <= stop < steps
    assert f"saved checkpoint {tmp_path / 'ck'}/iter_{stop:07d}" in first
    assert f"resumed from {tmp_path / 'ck'}/iter_{stop:07d} at step {stop}" in second, second[-3000:]
    assert min(step_lines(second)) == stop + 1 and max(step_lines(second)) == steps
    assert max(step_lines(first)) == stop
    assert (tmp_path / "ck" / f"iter_{steps:07d}" / "manifest.json").exists()


@pytest.mark.slow
def test_chained_submissions_resume_one_after_another(slurm, tmp_path):
    """``kla-launch --chain 2``: the second job waits on the first (--dependency=afterany); the
    first, signalled as at its time limit, checkpoints and ends without a requeue (KLA_REQUEUE=0);
    the second then starts and resumes from that checkpoint to the last step."""
    steps, logs = 60, tmp_path / "logs"
    logs.mkdir()
    cmd = ["kla-launch", "--scheduler", "slurm", "--cpu", "--nodes", "1", "--gpus-per-node", "1", "--chain", "2",
           "--cluster-env", "launch/slurm/env/cpu_local.env", "--time", "00:15:00", "--job-name", "kla-pretrain",
           "--sbatch-arg=--cpus-per-task=1", f"--sbatch-arg=--output={logs}/%x-%j.out",
           *tiny_train_args(tmp_path, "tiny_cpu.yaml", steps)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**slurm, "KLA_LOG_DIR": str(logs)}, cwd=REPO,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    first, second = re.findall(r"^kla-launch: submitted job (\d+)$", r.stdout, re.M)
    record = subprocess.run(["scontrol", "show", "job", "-o", second], capture_output=True, text=True,
                            env=slurm).stdout
    assert f"Dependency=afterany:{first}" in record, record
    t0 = time.time()
    while not re.search(r"^step 2/", node_logs(logs, first, 0), re.M):
        assert job_info(slurm, first).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), node_logs(logs, first, 0)
        assert job_info(slurm, second).get("JobState") == "PENDING", "the second job did not wait"
        assert time.time() - t0 < 600, "training did not start"
        time.sleep(0.5)
    subprocess.run(["scancel", "--batch", "--signal=USR1", first], check=True, env=slurm)
    done = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED")
    info1 = wait_for(slurm, first, lambda i: i.get("JobState") not in done)
    info2 = wait_for(slurm, second, lambda i: i.get("JobState") not in done)
    batch1 = (logs / f"kla-pretrain-{first}.out").read_text()
    log1, log2 = node_logs(logs, first, 0), node_logs(logs, second, 0)
    assert info1["JobState"] == "COMPLETED" and info1["Restarts"] == "0", (info1, batch1)
    assert "received SIGUSR1" in batch1 and "requeueing" not in batch1, batch1
    assert info2["JobState"] == "COMPLETED" and info2["ExitCode"] == "0:0", (
        f"{info2}\n{log2[-3000:]}\n--- slurm ---\n{cluster_logs(slurm, second)}")
    stop = int(re.search(r"checkpointing at step (\d+) and exiting", log1)[1])
    assert 2 <= stop < steps and max(step_lines(log1)) == stop
    assert f"resumed from {tmp_path / 'ck'}/iter_{stop:07d} at step {stop}" in log2, log2[-3000:]
    assert sorted(step_lines(log2)) == list(range(stop + 1, steps + 1))


@pytest.mark.slow
def test_preprocess_array_then_dependent_merge(slurm, tmp_path):
    """launch/slurm/preprocess_array.sbatch: a 2-task array tokenizes 3 shards, a job that waits
    for the array (afterok) merges them; the result equals one kla-preprocess run.
    65 s on the shared 2-core machine (3 jobs, each importing megatron-core)."""
    import json

    from data_tools.preprocess import PreprocessConfig, preprocess
    from data_tools.sample_corpus import sample_documents
    from data_tools.train_tokenizer import TokenizerConfig, train_tokenizer

    texts = [t for _, t in sample_documents()]
    raw, logs = tmp_path / "raw", tmp_path / "logs"
    raw.mkdir()
    logs.mkdir()
    for i in range(3):
        (raw / f"part-{i}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[i::3]))
    train_tokenizer(TokenizerConfig(inputs=[str(raw / "part-0.jsonl")], output_prefix=str(tmp_path / "tok"),
                                    vocab_size=512, num_threads=1))
    args = ["--input", str(raw), "--tokenizer", str(tmp_path / "tok.model"), "--output-prefix", str(tmp_path / "out")]

    def sbatch(*opts):
        r = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=1", "--time=00:10:00", *opts,
                            "launch/slurm/preprocess_array.sbatch", *args],
                           capture_output=True, text=True, env=slurm, cwd=REPO, timeout=60)
        assert r.returncode == 0, r.stderr
        return r.stdout.strip().split(";")[0]

    array = sbatch("--array=0-1", f"--output={logs}/%x-%A_%a.out")
    merge = sbatch(f"--dependency=afterok:{array}", "--export=ALL,KLA_MERGE=1", f"--output={logs}/merge-%j.out")

    def record():
        return subprocess.run(["scontrol", "show", "job", "-o", merge], capture_output=True, text=True,
                              env=slurm).stdout

    final = poll(record, lambda r: not re.search(r"JobState=(PENDING|RUNNING|CONFIGURING|COMPLETING)", r)
                 or "DependencyNeverSatisfied" in r, 300, f"merge job {merge}")
    out = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(logs.glob("*.out")))
    assert "JobState=COMPLETED" in final and "ExitCode=0:0" in final, final + out
    for task in (0, 1):
        log = (logs / f"kla-preprocess-{array}_{task}.out").read_text()
        assert f"--task-index {task} --task-count 2" in log and "shards         3" in log, out
    assert "(3 already finished, 0 done now;" in (logs / f"merge-{merge}.out").read_text(), out
    whole = preprocess(PreprocessConfig(inputs=[str(raw)], tokenizer_model=str(tmp_path / "tok.model"),
                                        output_prefix=str(tmp_path / "whole"), progress=False))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"out_text_document{ext}").read_bytes() == Path(whole.dataset_prefix + ext).read_bytes()
