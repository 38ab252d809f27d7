"""Checkpoint fault drills on CPU/gloo: checkpoints that look
complete but do not load, pickle payloads, two runs on one directory, a full disk, rerunning a
finished run. Each drill runs the tiny model for a few steps."""
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.test_train import _argv
from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_yaml(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny_test.yaml")


def _main(argv) -> tuple[int, str, str, list[str]]:
    """kla-pretrain's main() in this process: (exit code, stdout, stderr, our notice lines)."""
    import warnings

    from kla_megatron.train import main

    out, err = io.StringIO(), io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    notices = [line for line in out.getvalue().splitlines() if line.startswith("kla-pretrain: ")]
    return rc, out.getvalue(), err.getvalue(), notices


def _run(argv) -> dict:
    import warnings

    from kla_megatron.train import run

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = run(argv)
    return {"losses": dict(h.losses), "start": h.start_step, "resumed_from": h.resumed_from,
            "notices": [str(w.message) for w in caught if str(w.message).startswith("skipping checkpoint")]}


def _garble(path: Path) -> None:
    """Same-size garbage (a checkpoint that still looks complete by sizes)."""
    path.write_bytes(bytes((b + 101) % 256 for b in path.read_bytes()))


def _garble_tail(path: Path) -> None:
    """Same-size garbage in the second half of a shard (tensor data, after the byte items)."""
    data = path.read_bytes()
    half = len(data) // 2
    path.write_bytes(data[:half] + bytes((b + 101) % 256 for b in data[half:]))


def _drop_checksums(ckpt_dir: Path) -> None:
    """Make ``ckpt_dir`` look like a checkpoint written before manifests had checksums."""
    m = json.loads((ckpt_dir / "manifest.json").read_text())
    m.pop("checksums"), m.pop("checksum")
    (ckpt_dir / "manifest.json").write_text(json.dumps(m))


def _fresh_copy(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


# ---------------------------------------------------------------- item 2: complete-looking but unloadable


def _fallback_body(rank, world, model_yaml, root):
    from kla_megatron.checkpoint import directory as ckpt

    root = Path(root)
    base = root / "base"
    straight = _run(_argv(model_yaml, base, "--set", "checkpoint.save_interval=3"))
    manifest = ckpt.read_manifest(str(base / "iter_0000006"))
    out = {"straight": straight["losses"], "manifest": manifest, "cases": {}}
    cases = {
        "metadata_garbage": lambda d: _garble(d / "model" / ".metadata"),
        "metadata_json_garbage": lambda d: _garble(d / "model" / "metadata.json"),
        "shard_garbage": lambda d: _garble(next((d / "model").glob("*.distcp"))),
        # written before checksums: the load itself fails, and that is a skip too
        "legacy_metadata_garbage": lambda d: (_drop_checksums(d), _garble(d / "model" / ".metadata")),
        "legacy_common_garbage": lambda d: (_drop_checksums(d), _garble(d / "model" / "common.pt")),
        "legacy_tensor_garbage": lambda d: (_drop_checksums(d), _garble_tail(next((d / "model").glob("*.distcp")))),
    }
    for name, corrupt in cases.items():
        ck = _fresh_copy(base, root / name)
        corrupt(ck / "iter_0000006")
        out["cases"][name] = _run(_argv(model_yaml, ck))
    # every checkpoint bad: one error line, exit 3, not a traceback and not a fresh start
    ck = _fresh_copy(base, root / "all_bad")
    for d in ("iter_0000003", "iter_0000006"):
        _garble(ck / d / "model" / "metadata.json")
    out["all_bad"] = _main(_argv(model_yaml, ck))
    return out


def test_checkpoint_that_does_not_load_is_skipped_and_the_previous_one_resumes(model_yaml, tmp_path):
    (res,) = run_on_ranks(_fallback_body, world_size=1, args=(str(model_yaml), str(tmp_path)))
    m = res["manifest"]
    assert m["checksum"] in ("xxh3_64", "crc32") and set(m["checksums"]) == set(m["files"])
    expect_file = {"metadata_garbage": "model/.metadata", "metadata_json_garbage": "model/metadata.json",
                   "shard_garbage": ".distcp", "legacy_metadata_garbage": "model/.metadata",
                   "legacy_common_garbage": "model/common.pt", "legacy_tensor_garbage": "does not load"}
    for name, case in res["cases"].items():
        skipped = [n for n in case["notices"] if n.startswith("skipping checkpoint")]
        assert len(skipped) == 1 and "\n" not in skipped[0], (name, case["notices"])
        assert "iter_0000006" in skipped[0] and expect_file[name] in skipped[0], (name, skipped)
        assert case["resumed_from"].endswith("iter_0000003") and case["start"] == 3, name
        for step in (4, 5, 6):  # bitwise: deterministic CPU run resumed from step 3
            assert case["losses"][step] == res["straight"][step], (name, step)
    rc, out, err, notices = res["all_bad"]
    assert rc == 3, (out, err)
    assert len(notices) == 2 and all(n.startswith("kla-pretrain: skipping checkpoint") and "metadata.json" in n
                                     for n in notices), notices
    errors = [line for line in err.splitlines() if line.startswith("kla-pretrain:")]
    assert len(errors) == 1 and "none of the 2 checkpoint(s)" in errors[0], err
    assert "Traceback" not in err and "step 1/" not in out


# ---------------------------------------------------------------- item 13: loading runs no code


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(ckpt_dir: Path, rel: str, marker: Path) -> None:
    """Put a pickle that runs ``touch marker`` into ``rel`` and fix the manifest up to match, as
    someone who hands out a checkpoint directory could."""
    import pickle

    import torch

    from kla_megatron.checkpoint import directory as ckpt

    f = ckpt_dir / rel
    if rel.endswith(".metadata"):
        f.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        state = torch.load(f, weights_only=False)  # our own file, written by the run above
        state["extra"] = _Payload(marker)
        torch.save(state, f)
    m = json.loads((ckpt_dir / "manifest.json").read_text())
    m["files"][rel] = f.stat().st_size
    if "checksums" in m:
        m["checksums"][rel] = ckpt.file_checksum(str(f), m["checksum"])
    (ckpt_dir / "manifest.json").write_text(json.dumps(m))


def _payload_body(rank, world, model_yaml, root):
    import numpy
    import torch

    from kla_megatron.checkpoint import directory as ckpt

    root = Path(root)
    base = root / "base"
    straight = _run(_argv(model_yaml, base, "--set", "checkpoint.save_interval=3"))
    out = {"straight": straight["losses"], "cases": {}, "markers": {}}
    for rel in ("rng/rank_00000.pt", "model/.metadata", "model/common.pt"):
        name = rel.replace("/", "_")
        ck = _fresh_copy(base, root / name)
        marker = root / f"{name}.ran"
        _plant(ck / "iter_0000006", rel, marker)
        out["cases"][rel] = _run(_argv(model_yaml, ck))
        out["markers"][rel] = marker.exists()
    # a planted checkpoint named by checkpoint.resume: one error line, exit 3, nothing run
    ck = _fresh_copy(base, root / "explicit")
    marker = root / "explicit.ran"
    _plant(ck / "iter_0000006", "rng/rank_00000.pt", marker)
    out["explicit"] = _main(_argv(model_yaml, root / "explicit_out", "--set",
                                  f"checkpoint.resume={ck / 'iter_0000006'}"))
    out["markers"]["explicit"] = marker.exists()
    # the RNG file is plain data now: loads with weights_only=True and no extra globals
    rng_file = base / "iter_0000006" / "rng" / "rank_00000.pt"
    out["rng_unsafe_globals"] = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(rng_file)))
    state = torch.load(rng_file, weights_only=True)
    out["rng_keys"] = sorted(state)
    # an RNG file in the old format (tuples, a numpy array) still loads, and restores the state
    import random

    legacy = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state(),
              "tracker": {k: v.clone() for k, v in state["tracker"].items()}}
    expected = (random.random(), float(numpy.random.rand()), float(torch.rand(1)))
    legacy_dir = root / "legacy"
    (legacy_dir / "rng").mkdir(parents=True)
    torch.save(legacy, legacy_dir / "rng" / "rank_00000.pt")
    out["legacy_audit"] = ckpt.audit(str(legacy_dir))
    ckpt.load_rng(str(legacy_dir), 0)
    out["legacy_restored"] = (random.random(), float(numpy.random.rand()), float(torch.rand(1))) == expected
    return out


def test_a_pickle_payload_in_a_checkpoint_is_refused_and_never_runs(model_yaml, tmp_path):
    (res,) = run_on_ranks(_payload_body, world_size=1, args=(str(model_yaml), str(tmp_path)))
    assert res["rng_unsafe_globals"] == [] and res["rng_keys"] == ["format", "numpy", "python", "torch", "tracker"]
    assert res["legacy_audit"] is None and res["legacy_restored"]
    assert not any(res["markers"].values()), res["markers"]  # no payload ran
    for rel, case in res["cases"].items():
        skipped = [n for n in case["notices"] if n.startswith("skipping checkpoint")]
        assert len(skipped) == 1 and rel in skipped[0] and "refused" in skipped[0], (rel, case["notices"])
        assert "posix.system" in skipped[0] or "os.system" in skipped[0], skipped
        assert case["resumed_from"].endswith("iter_0000003"), rel
        for step in (4, 5, 6):
            assert case["losses"][step] == res["straight"][step], (rel, step)
    rc, out, err, _ = res["explicit"]
    errors = [line for line in err.splitlines() if line.startswith("kla-pretrain:")]
    assert rc == 3 and len(errors) == 1, (rc, err)
    assert "checkpoint.resume" in errors[0] and "rng/rank_00000.pt refused" in errors[0] and "Traceback" not in err


# ---------------------------------------------------------------- item 3: one run per directory


def _spawn_holder(root: Path) -> subprocess.Popen:
    code = ("import sys, time; from kla_megatron.checkpoint.directory import RunLock; "
            "RunLock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_run_lock_refuses_a_live_holder_and_takes_over_stale_ones(tmp_path, monkeypatch):
    import warnings

    from kla_megatron.checkpoint import directory as ckpt

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    root = tmp_path / "ck"
    holder = _spawn_holder(root)
    try:
        with pytest.raises(ckpt.CheckpointLockedError) as info:
            ckpt.RunLock.acquire(str(root))
        msg = str(info.value)
        assert "\n" not in msg and f"host {socket.gethostname()} pid {holder.pid}" in msg, msg
        # a .tmp being written by a live process is never deleted
        tmp = root / "iter_0000007.tmp"
        tmp.mkdir()
        (tmp / "writer.json").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                     "start": ckpt._proc_start(holder.pid)}))
        with pytest.raises(ckpt.CheckpointLockedError, match="being written by"):
            ckpt.begin(str(root), 7)
        assert tmp.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: its lock and its .tmp are stale on this host
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lock = ckpt.RunLock.acquire(str(root))
        assert ckpt.begin(str(root), 7, lock) == str(tmp)
    notes = [str(w.message) for w in caught]
    assert any(f"taking over the lock of host {socket.gethostname()} pid {holder.pid}" in n and "exited" in n
               for n in notes), notes
    assert any("removing partial checkpoint" in n and str(holder.pid) in n for n in notes), notes
    lock.release()
    assert (root / ".lock").read_text() == ""  # a clean exit clears the record

    # a record from another host: refused while its heartbeat is fresh, taken over (reported) after
    other = {"host": "node-elsewhere", "pid": 4242, "job": "777", "since": "earlier", "token": "t"}
    (root / ".lock").write_text(json.dumps(other))
    with pytest.raises(ckpt.CheckpointLockedError, match="host node-elsewhere pid 4242, Slurm job 777"):
        ckpt.RunLock.acquire(str(root))
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the same job, requeued: its earlier attempt is over
    with pytest.warns(ckpt.CheckpointWarning, match="earlier attempt of this Slurm job 777"):
        ckpt.RunLock.acquire(str(root)).release()
    monkeypatch.delenv("SLURM_JOB_ID")
    (root / ".lock").write_text(json.dumps(other))
    old = time.time() - ckpt.STALE_SECONDS - 60
    os.utime(root / ".lock", (old, old))
    with pytest.warns(ckpt.CheckpointWarning, match="node-elsewhere.*no heartbeat for"):
        ckpt.RunLock.acquire(str(root)).release()


def test_second_job_on_one_checkpoint_dir_exits_5_naming_the_first(model_yaml, tmp_path):
    ck = tmp_path / "ck"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)
    cmd = [sys.executable, "-m", "kla_megatron.train"]
    first = subprocess.Popen(cmd + _argv(model_yaml, ck, "--set", "train.steps=1000", "--set",
                                         "train.deterministic=false"),
                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines, deadline = [], time.time() + 120
        for line in first.stdout:
            lines.append(line)
            if line.startswith("step 1/"):
                break
            assert time.time() < deadline, "".join(lines[-20:])
        second = subprocess.run(cmd + _argv(model_yaml, ck), cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=120)
        assert first.poll() is None, "".join(lines[-20:])
        assert second.returncode == 5, second.stderr[-3000:]
        err = [l for l in second.stderr.splitlines() if l.startswith("kla-pretrain:")]
        assert len(err) == 1 and f"host {socket.gethostname()} pid {first.pid}" in err[0], second.stderr[-3000:]
        assert "Traceback" not in second.stderr and "step 1/" not in second.stdout
        first.send_signal(signal.SIGTERM)  # the first run is unharmed: it checkpoints and exits 0
        out, _ = first.communicate(timeout=120)
        assert first.returncode == 0 and "saved checkpoint" in out, out[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


# ---------------------------------------------------------------- item 4: disk full during a save


def _disk_full_body(rank, world, model_yaml, root):
    """Writes of the step-6 checkpoint fail with ENOSPC after 100 kB (in megatron's forked writer
    processes too), as on a full disk."""
    import builtins
    import errno

    from kla_megatron.checkpoint import directory as ckpt

    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self._f, self._left = f, 100_000

        def write(self, data):
            data = memoryview(data).cast("B")
            if len(data) > self._left:
                self._f.write(data[: self._left])
                self._left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

    def full_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if "iter_0000006.tmp" in str(file) and "b" in mode and ("w" in mode or "a" in mode):
            return FullDisk(f)
        return f

    ck = Path(root) / "ck"
    builtins.open = full_open
    try:
        rc, out, err, _ = _main(_argv(model_yaml, ck, "--set", "checkpoint.save_interval=3"))
    finally:
        builtins.open = real_open
    return {"rc": rc, "out": out, "err": err, "entries": sorted(os.listdir(ck)),
            "iter3": ckpt.check(str(ck / "iter_0000003"))}


def test_disk_full_during_a_save_cleans_up_and_exits_4(model_yaml, tmp_path):
    (res,) = run_on_ranks(_disk_full_body, world_size=1, args=(str(model_yaml), str(tmp_path)))
    assert res["rc"] == 4, res["err"][-3000:]
    ours = [l for l in res["err"].splitlines() if l.startswith("kla-pretrain:")]
    assert len(ours) == 1, res["err"][-3000:]
    line = ours[0]
    assert "no space left on device while saving checkpoint" in line and "iter_0000006" in line, line
    assert "a checkpoint needs about" in line and "earlier checkpoints kept: iter_0000003" in line, line
    assert res["entries"] == [".lock", "iter_0000003"], res["entries"]  # no partial .tmp left behind
    assert res["iter3"] is None and "saved checkpoint" in res["out"]


def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs `unshare -m` and mount (root) for a tiny tmpfs")
def test_disk_full_on_a_real_tiny_tmpfs_exits_4(model_yaml, tmp_path):
    """The real thing: a 2.2 MB tmpfs holds the step-3 checkpoint (1.4 MB) but not a second one."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = " ".join(f"'{a}'" for a in _argv(model_yaml, mnt / "ck", "--set", "checkpoint.save_interval=3"))
    script = (f"mount -t tmpfs -o size=2200k tmpfs '{mnt}' || exit 99; "
              f"'{sys.executable}' -m kla_megatron.train {argv}; echo \"rc=$?\"; ls -A '{mnt}/ck'")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(["unshare", "-m", "bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert "rc=4" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    ours = [l for l in r.stderr.splitlines() if l.startswith("kla-pretrain:")]
    assert len(ours) == 1 and "no space left on device" in ours[0] and "iter_0000006" in ours[0], r.stderr[-3000:]
    assert r.stdout.split("rc=4", 1)[1].split() == [".lock", "iter_0000003"], r.stdout[-2000:]


# ---------------------------------------------------------------- item 7: rerunning a finished run


def _finished_body(rank, world, model_yaml, root):
    ck = Path(root) / "ck"
    argv = _argv(model_yaml, ck, "--set", "train.steps=3")
    first = _main(argv)
    last = ck / "iter_0000003"

    def snapshot():
        return {p.relative_to(ck).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
                for p in [last, *last.rglob("*")]}

    before = snapshot()
    again = _main(argv)
    return {"first": first[:3], "again": again[:3], "same": snapshot() == before, "entries": sorted(os.listdir(ck))}


def test_rerunning_a_finished_run_says_so_and_leaves_the_checkpoint_alone(model_yaml, tmp_path):
    (res,) = run_on_ranks(_finished_body, world_size=1, args=(str(model_yaml), str(tmp_path)))
    assert res["first"][0] == 0, res["first"][2][-3000:]
    rc, out, err = res["again"]
    assert rc == 0, err[-3000:]
    assert "the run is complete" in out and "iter_0000003 is at step 3 of 3" in out, out
    assert "step 1/" not in out and "saved checkpoint" not in out, out
    assert res["same"], "the finished run's checkpoint was rewritten"
    assert res["entries"] == [".lock", "iter_0000003"]
