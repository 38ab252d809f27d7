"""checkpoint/directory.py's run lock, RNG files and pickle audit in one process: who may take a
locked checkpoint.dir and the line that says so, a lost lock, RNG states round-tripping through
their files (current and legacy formats), and which pickles a checkpoint may hold. Written
against bench/mutation.sh's surviving mutants; tests/test_checkpoint_faults.py runs the same
with real processes."""
import json
import os
import pickle
import random
import socket
import time

import numpy
import pytest
import torch

from kla_megatron.checkpoint import directory as ckpt

HOST = socket.gethostname()


def _holder(tmp_path, **record):
    (tmp_path / ".lock").write_text(json.dumps({"token": "theirs", "since": "then", **record}))


def test_lock_is_exclusive_and_a_clean_release_leaves_no_record(tmp_path):
    lock = ckpt.RunLock.acquire(str(tmp_path))
    try:
        assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.record["token"]
        lock.check()
        with pytest.raises(ckpt.CheckpointLockedError, match=rf"^checkpoint.dir {tmp_path} is in use by another "
                                                             rf"run: host {HOST} pid {os.getpid()} .*Stop that run "
                                                             rf"or choose another checkpoint.dir; if that run is "
                                                             rf"dead, delete {tmp_path}/.lock$"):
            ckpt.RunLock.acquire(str(tmp_path))
    finally:
        lock.release()
    assert (tmp_path / ".lock").read_text() == "" and lock.fd is None
    lock.release()  # twice is fine
    again = ckpt.RunLock.acquire(str(tmp_path))
    again.release()


@pytest.mark.parametrize("record, why", [
    ({"host": HOST, "pid": 2 ** 22 + 7}, f"process {2 ** 22 + 7} has exited"),
    ({"host": HOST, "pid": "12"}, "process 12 has exited"),
    ({"host": HOST, "pid": os.getppid()}, f"process {os.getppid()} no longer holds the lock"),
    ({"host": HOST, "pid": os.getpid()}, "an earlier run of this process did not release it"),
    ({"host": "elsewhere", "pid": 1, "job": "55"}, "it is an earlier attempt of this Slurm job 55"),
])
def test_stale_holders_are_taken_over_with_the_reason(tmp_path, monkeypatch, record, why):
    monkeypatch.setenv("SLURM_JOB_ID", "55")
    _holder(tmp_path, **record)
    with pytest.warns(ckpt.CheckpointWarning, match=f"^checkpoint.dir {tmp_path}: taking over the lock of "
                                                    f".*: {why}$"):
        lock = ckpt.RunLock.acquire(str(tmp_path))
    lock.release()


def test_another_hosts_lock_holds_until_its_heartbeat_is_stale(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    _holder(tmp_path, host="elsewhere", pid=1, job="9")
    with pytest.raises(ckpt.CheckpointLockedError, match=r"host elsewhere pid 1, Slurm job 9 \(since then\), "
                                                         r"heartbeat \d s ago\. Stop"):
        ckpt.RunLock.acquire(str(tmp_path))
    old = time.time() - ckpt.STALE_SECONDS - 100
    os.utime(tmp_path / ".lock", (old, old))
    with pytest.warns(ckpt.CheckpointWarning, match=r": no heartbeat for 40\d s \(> KLA_LOCK_STALE_SECONDS=300\)$"):
        lock = ckpt.RunLock.acquire(str(tmp_path))
    lock.release()


def test_a_lock_lost_to_another_run_stops_the_save(tmp_path):
    lock = ckpt.RunLock.acquire(str(tmp_path))
    try:
        os.pwrite(lock.fd, json.dumps({"token": "other", "host": "h2", "pid": 4, "since": "s"}).encode() + b" " * 400, 0)
        with pytest.raises(ckpt.CheckpointLockedError, match=rf"^lost the lock on checkpoint.dir {tmp_path} to host h2 "
                                                             r"pid 4 \(since s\); not saving \(two runs on one"):
            ckpt.begin(str(tmp_path), 1, lock)
        assert not (tmp_path / "iter_0000001.tmp").exists()
        os.ftruncate(lock.fd, 0)
        with pytest.raises(ckpt.CheckpointLockedError, match="to an unknown process"):
            lock.check()
    finally:
        lock.release()
    assert "other" in (tmp_path / ".lock").read_text() or (tmp_path / ".lock").read_text() == ""


def test_the_heartbeat_refreshes_the_lock_file(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "HEARTBEAT_SECONDS", 0.05)
    lock = ckpt.RunLock.acquire(str(tmp_path))
    try:
        old = time.time() - 1000
        os.utime(tmp_path / ".lock", (old, old))
        time.sleep(0.5)
        assert lock._heartbeat_age() < 100
    finally:
        lock.release()
    assert not lock._thread.is_alive()


def _draws():
    return random.random(), random.gauss(0, 1), numpy.random.rand(), float(torch.rand(1))


@pytest.mark.parametrize("legacy", [False, True])
def test_rng_states_round_trip_through_their_file(tmp_path, legacy, monkeypatch):
    (tmp_path / "rng").mkdir()
    random.seed(1), numpy.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1), numpy.random.randn()  # leave a cached gaussian in both
    if legacy:  # files written before format 1: tuples and numpy arrays
        monkeypatch.setattr(ckpt, "rng_state", lambda: {"python": random.getstate(), "numpy": numpy.random.get_state(),
                                                        "torch": torch.get_rng_state(), "tracker": {}})
    ckpt.save_rng(str(tmp_path), 3)
    assert os.listdir(tmp_path / "rng") == ["rank_00003.pt"]
    first = _draws()
    _draws()
    assert ckpt.load_rng(str(tmp_path), 3) and _draws() == first
    assert not ckpt.load_rng(str(tmp_path), 4)
    assert ckpt.audit(str(tmp_path)) is None


def test_rng_state_is_plain_data():
    state = ckpt.rng_state()
    assert state["format"] == 1 and state["numpy"]["algorithm"] == "MT19937"
    assert state["python"]["state"].dtype == torch.int64 and state["numpy"]["keys"].dtype == torch.int64
    assert isinstance(state["numpy"]["pos"], int) and isinstance(state["numpy"]["cached_gaussian"], float)


class Payload:  # a pickle global outside weights_only's allowlist
    pass


def test_audit_refuses_pickles_that_could_run_code(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "rng").mkdir()
    assert ckpt.audit(str(tmp_path)) is None
    torch.save({"w": torch.zeros(2)}, tmp_path / "model" / "common.pt")
    assert ckpt.audit(str(tmp_path)) is None
    torch.save({"w": Payload()}, tmp_path / "rng" / "rank_00000.pt")
    assert ckpt.audit(str(tmp_path)) == (f"file rng/rank_00000.pt refused: it refers to {__name__}.Payload, which "
                                         "could run code when loaded")
    torch.save({"w": Payload()}, tmp_path / "model" / "common.pt")
    assert ckpt.audit(str(tmp_path)).startswith("file model/common.pt refused: it refers to ")
    (tmp_path / "model" / "common.pt").write_bytes(b"not torch")
    assert ckpt.audit(str(tmp_path)).startswith("file model/common.pt is not a readable torch file (")
    (tmp_path / "model" / "metadata.json").write_text("{")
    assert ckpt.audit(str(tmp_path)).startswith("file model/metadata.json is not valid JSON (JSONDecodeError: ")


def test_audit_of_torch_dist_metadata(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    meta = model / ".metadata"
    meta.write_bytes(pickle.dumps(os.getcwd))
    assert ckpt.audit(str(tmp_path)) == "file model/.metadata refused: it refers to posix.getcwd, which could run " \
                                        "code when loaded"
    meta.write_bytes(pickle.dumps({"a": torch.Size([2]), "d": torch.float16}))
    assert ckpt.audit(str(tmp_path)) == "file model/.metadata is not torch_dist metadata"
    meta.write_bytes(b"garbage")
    assert ckpt.audit(str(tmp_path)).startswith("file model/.metadata is unreadable (")
    assert ckpt._allowed_global("torch", "float16") is torch.float16
    assert ckpt._allowed_global("collections", "OrderedDict").__name__ == "OrderedDict"
    for module, name in [("torch", "load"), ("torch.distributed.checkpoint.metadata", "cast"), ("os", "system")]:
        with pytest.raises(pickle.UnpicklingError, match=f"it refers to {module}.{name}"):
            ckpt._allowed_global(module, name)


def _dcp_save(model, state):
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(model))
    meta = pickle.loads((model / ".metadata").read_bytes())
    meta.storage_meta = None  # the checkpoint_id as a pathlib.Path: megatron's own writer stores none
    (model / ".metadata").write_bytes(pickle.dumps(meta))


def test_audit_checks_each_byte_item_of_torch_dist_shards(tmp_path):
    model = tmp_path / "model"
    _dcp_save(model, {"w": torch.arange(4.0), "extra": {"step": 3, "name": "x"}})
    assert ckpt.audit(str(tmp_path)) is None
    _dcp_save(model, {"w": torch.arange(4.0), "obj": Payload()})
    assert ckpt.audit(str(tmp_path)) == (f"file model/__0_0.distcp refused: item obj refers to {__name__}.Payload, "
                                         "which could run code when loaded")
    shard = model / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:40])  # the item's bytes are gone
    assert ckpt.audit(str(tmp_path)).startswith("file model/__0_0.distcp: item obj is unreadable (")
    meta = pickle.loads((model / ".metadata").read_bytes())
    for info in meta.storage_data.values():
        info.transform_descriptors = ["zstd"]
    (model / ".metadata").write_bytes(pickle.dumps(meta))
    assert ckpt.audit(str(tmp_path)) == ("file model/__0_0.distcp: item obj is stored transformed (['zstd']); "
                                         "cannot check it")


def _resave_failing(tmp_path, monkeypatch, fail_on):
    from tests.test_mutants_checkpoint import _save

    _save(tmp_path, 5, b"old")
    real = os.rename
    monkeypatch.setattr(ckpt.os, "rename", lambda a, b: (_ for _ in ()).throw(OSError(5, "I/O error"))
                        if a.endswith(fail_on) else real(a, b))
    return _save


def test_a_failed_publish_puts_the_replaced_checkpoint_back(tmp_path, monkeypatch):
    save = _resave_failing(tmp_path, monkeypatch, ".tmp")
    with pytest.raises(OSError, match="I/O error"):
        save(tmp_path, 5, b"new")
    assert sorted(os.listdir(tmp_path)) == ["iter_0000005"]
    assert (tmp_path / "iter_0000005" / "model" / "w.bin").read_bytes() == b"old"


def test_an_unreadable_file_fails_the_save_naming_it(tmp_path, monkeypatch):
    from tests.test_mutants_checkpoint import _save

    monkeypatch.setattr(ckpt, "file_checksum", lambda path, algo="": (_ for _ in ()).throw(OSError(5, "I/O error")))
    with pytest.raises(RuntimeError, match=r"^saving checkpoint .*iter_0000002 failed \(partial save removed\): "
                                           r"\S+: OSError: \[Errno 5\] I/O error$"):
        _save(tmp_path, 2)
    assert os.listdir(tmp_path) == []


def test_a_save_that_cannot_start_raises_its_own_error(tmp_path):
    root = tmp_path / "file"
    root.write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        ckpt.begin(str(root), 1)


def test_abort_reports_other_ranks_failures_and_what_is_left(tmp_path):
    (tmp_path / "iter_0000003.tmp").mkdir()
    with pytest.raises(RuntimeError, match=rf"^saving checkpoint {tmp_path}/iter_0000003 failed \(partial save "
                                           r"removed\): rank 1: boom$"):
        ckpt._abort_save(str(tmp_path), 3, [None, {"disk_full": False, "text": "rank 1: boom"}], None)
    assert not (tmp_path / "iter_0000003.tmp").exists()
    with pytest.raises(ckpt.DiskFullError, match=r"\(rank 1 full\); 0 B were written before it failed, .* free; "
                                                 r"partial save removed, earlier checkpoints kept: none$"):
        ckpt._abort_save(str(tmp_path), 3, [None, {"disk_full": True, "text": "rank 1 full"}], None)


def test_a_failure_on_a_full_disk_without_its_errno_is_found_by_a_test_write(tmp_path, monkeypatch):
    assert not ckpt._out_of_space(str(tmp_path)) and os.listdir(tmp_path) == []  # the probe is removed
    where = []
    monkeypatch.setattr(ckpt, "_out_of_space", lambda path: where.append(path) or True)
    assert ckpt._failure(RuntimeError("unexpected pos 12"), str(tmp_path), 4) == {
        "disk_full": True, "text": "RuntimeError: unexpected pos 12; a 1 MiB test write there fails with ENOSPC/EDQUOT"}
    (tmp_path / "iter_0000004.tmp").mkdir()
    ckpt._failure(RuntimeError("x"), str(tmp_path), 4)
    assert where == [str(tmp_path), str(tmp_path / "iter_0000004.tmp")]
    assert ckpt._failure(OSError(28, "No space left on device"), str(tmp_path), 4)["disk_full"] and len(where) == 2
