"""checkpoint/directory.py in one process, without a trainer: save (begin, write, commit) and
re-save, the manifest, what verify/check report for each kind of damage, which checkpoints
latest/prune see, the writer records of the lock, one-line errors, byte formatting, the disk-full
test and the checksum share of each rank. Written against bench/mutation.sh's surviving mutants
(the trainer runs in tests/test_checkpoint_faults.py reach the same code, too slowly to run once
per mutant)."""
import errno
import json
import os
import socket
import warnings
import zlib

import pytest

from kla_megatron.checkpoint import directory as ckpt


def _save(root, step, payload=b"weights", keep_last=0):
    tmp = ckpt.begin(str(root), step)
    with open(os.path.join(tmp, "model", "w.bin"), "wb") as f:
        f.write(payload)
    ckpt.finish_writes(str(root), step, None)
    return ckpt.commit(str(root), step, {"consumed_samples": 8 * step}, keep_last)


def test_step_dirs_are_zero_padded_to_seven_digits(tmp_path):
    assert ckpt.step_dir("r", 42) == os.path.join("r", "iter_0000042")


def test_a_saved_checkpoint_has_its_manifest_and_checks_clean(tmp_path):
    path = _save(tmp_path, 5)
    assert path == str(tmp_path / "iter_0000005") and not os.path.exists(path + ".tmp")
    manifest = ckpt.read_manifest(path)
    assert manifest["step"] == 5 and manifest["consumed_samples"] == 40 and manifest["checksum"] == ckpt.CHECKSUM
    assert manifest["files"] == {os.path.join("model", "w.bin"): 7, "writer.json": os.path.getsize(
        os.path.join(path, "writer.json"))}
    assert manifest["checksums"][os.path.join("model", "w.bin")] == ckpt.file_checksum(
        os.path.join(path, "model", "w.bin"))
    assert set(manifest["checksums"]) == set(manifest["files"])
    writer = json.load(open(os.path.join(path, "writer.json")))
    assert writer["pid"] == os.getpid() and writer["host"] == socket.gethostname()
    assert ckpt.incomplete_reason(path) is None and ckpt.check(path) is None
    assert ckpt.latest(str(tmp_path)) == path


def test_resaving_a_step_replaces_it(tmp_path):
    _save(tmp_path, 5, b"old")
    path = _save(tmp_path, 5, b"newer")
    assert open(os.path.join(path, "model", "w.bin"), "rb").read() == b"newer"
    assert sorted(os.listdir(tmp_path)) == ["iter_0000005"]


def test_a_leftover_tmp_of_a_dead_writer_is_removed_with_a_notice(tmp_path):
    tmp = tmp_path / "iter_0000003.tmp"
    (tmp / "model").mkdir(parents=True)
    (tmp / "writer.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}))
    (tmp / "model" / "stale.bin").write_bytes(b"x")
    with pytest.warns(ckpt.CheckpointWarning, match=r"removing partial checkpoint .*iter_0000003.tmp left by "
                                                    r"host elsewhere pid 1 \(since then\)"):
        ckpt.begin(str(tmp_path), 3)
    assert not (tmp / "model" / "stale.bin").exists() and (tmp / "rng").is_dir()


def test_a_tmp_being_written_by_a_live_process_is_not_touched(tmp_path):
    tmp = tmp_path / "iter_0000003.tmp"
    tmp.mkdir()
    parent = {"host": socket.gethostname(), "pid": os.getppid(), "since": "now"}
    (tmp / "writer.json").write_text(json.dumps(parent))
    with pytest.raises(ckpt.CheckpointLockedError, match=rf"is being written by host .* pid {os.getppid()} "):
        ckpt.begin(str(tmp_path), 3)
    assert (tmp / "writer.json").exists()


def test_a_failed_write_removes_the_partial_save_and_reraises(tmp_path):
    _save(tmp_path, 1)
    ckpt.begin(str(tmp_path), 2)
    with pytest.raises(KeyError, match="boom"):
        ckpt.finish_writes(str(tmp_path), 2, KeyError("boom"))
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001"]


def test_a_full_disk_is_a_disk_full_error_saying_what_was_kept(tmp_path):
    _save(tmp_path, 1, b"x" * 2048)
    tmp = ckpt.begin(str(tmp_path), 2)
    (open(os.path.join(tmp, "model", "part"), "wb")).write(b"y" * 3000)
    full = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ckpt.DiskFullError, match=r"no space left on device while saving checkpoint .*iter_0000002 "
                                                 r"\(OSError: \[Errno 28\] No space left on device\); a checkpoint "
                                                 r"needs about 2\.\d KiB \(the size of iter_0000001\), "
                                                 r"\d\.\d KiB were written before it failed, .* free; partial "
                                                 r"save removed, earlier checkpoints kept: iter_0000001"):
        ckpt.finish_writes(str(tmp_path), 2, full)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000001"]


def _damaged(tmp_path, how):
    path = _save(tmp_path, 7, b"weights")
    w = os.path.join(path, "model", "w.bin")
    if how == "manifest":
        os.remove(os.path.join(path, "manifest.json"))
    elif how == "missing":
        os.remove(w)
    elif how == "size":
        open(w, "wb").write(b"weights!")
    elif how == "flip":
        open(w, "wb").write(b"weightz")
    elif how == "garbage":
        open(os.path.join(path, "manifest.json"), "w").write("{not json")
    elif how == "list":
        open(os.path.join(path, "manifest.json"), "w").write('{"files": [1]}')
    return path


@pytest.mark.parametrize("how, problem", [
    ("manifest", r"^no manifest.json \(partially written\)$"),
    ("missing", r"^missing file model/w.bin$"),
    ("size", r"^file model/w.bin has 8 bytes, manifest says 7$"),
    ("garbage", r"^unreadable manifest.json \(JSONDecodeError: "),
    ("list", r"^unreadable manifest.json \(AttributeError: "),
])
def test_verify_names_what_is_incomplete(tmp_path, how, problem):
    path = _damaged(tmp_path, how)
    assert ckpt.incomplete_reason(path) is not None
    import re
    assert re.search(problem, ckpt.incomplete_reason(path)), ckpt.incomplete_reason(path)
    assert ckpt.check(path) == ckpt.incomplete_reason(path)
    with pytest.warns(ckpt.CheckpointWarning, match=f"skipping checkpoint {path}: "):
        assert ckpt.latest(str(tmp_path)) is None


def test_check_finds_a_flipped_byte_by_its_checksum(tmp_path):
    path = _damaged(tmp_path, "flip")
    assert ckpt.incomplete_reason(path) is None
    assert ckpt.check(path).startswith(f"file model/w.bin is corrupt (its {ckpt.CHECKSUM} checksum ")
    assert "differs from the manifest's" in ckpt.check(path)


def test_checksums_not_computable_here_are_skipped_with_a_notice(tmp_path):
    path = _save(tmp_path, 7)
    manifest = ckpt.read_manifest(path)
    json.dump({**manifest, "checksum": "md99"}, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.warns(ckpt.CheckpointWarning, match="cannot verify the md99 checksums of .*md99 is not available"):
        assert ckpt.verify_checksums(path) is None
    json.dump({**manifest, "checksums": {}}, open(os.path.join(path, "manifest.json"), "w"))
    assert ckpt.verify_checksums(path) is None


def test_candidates_latest_and_prune(tmp_path):
    for step in (3, 10, 7):
        _save(tmp_path, step)
    (tmp_path / "iter_0000011.tmp").mkdir()
    (tmp_path / "iter_12").mkdir()
    (tmp_path / "iter_0000009").mkdir()  # no manifest
    assert [s for s, _ in ckpt.candidates(str(tmp_path))] == [10, 9, 7, 3]
    assert ckpt.candidates(str(tmp_path / "nope")) == [] and ckpt.candidates("") == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ckpt.latest(str(tmp_path)) == str(tmp_path / "iter_0000010")
        assert [s for s, _ in ckpt.complete_checkpoints(str(tmp_path))] == [3, 7, 10]
    ckpt.prune(str(tmp_path), 0)
    assert len(ckpt.candidates(str(tmp_path))) == 4
    ckpt.prune(str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["iter_0000007", "iter_0000009", "iter_0000010", "iter_0000011.tmp",
                                            "iter_12"]
    _save(tmp_path, 12, keep_last=1)
    assert [s for s, _ in ckpt.candidates(str(tmp_path))] == [12, 9]


def test_one_line_errors():
    assert ckpt.one_line(ValueError("a\n  b \n\n c")) == "ValueError: a b c"
    assert ckpt.one_line(ValueError("")) == "ValueError: (no message)"
    assert ckpt.one_line(ValueError("x" * 20), limit=10) == "ValueError: xxxxxxx..."
    assert ckpt.one_line(ValueError("x" * 10), limit=10) == "ValueError: " + "x" * 10
    remote = RuntimeError("Traceback (most recent call last):\n  File x\nOSError: gone " + "y" * 20)
    assert ckpt.one_line(remote, limit=14) == "OSError: gone "


def test_byte_counts_for_people():
    assert [ckpt._fmt_bytes(n) for n in (0, 1023, 1024, 1536, 5 << 20, 3 << 30, 2 << 40, 5000 << 40)] == \
        ["0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "3.0 GiB", "2.0 TiB", "5000.0 TiB"]


def test_crc32_checksum_of_a_file_larger_than_the_read_buffer(tmp_path):
    data = bytes(range(256)) * 40000  # 10 MB: more than one 8 MiB read
    (tmp_path / "f").write_bytes(data)
    assert ckpt.file_checksum(str(tmp_path / "f"), "crc32") == f"{zlib.crc32(data):08x}"
    (tmp_path / "e").write_bytes(b"")
    assert ckpt.file_checksum(str(tmp_path / "e"), "crc32") == "00000000"
    with pytest.raises(ValueError, match=r"^checksum algorithm md99 is not available \(pip install xxhash\)$"):
        ckpt.file_checksum(str(tmp_path / "f"), "md99")
    if ckpt.xxhash is not None:
        import xxhash
        assert ckpt.file_checksum(str(tmp_path / "f"), "xxh3_64") == xxhash.xxh3_64(data).hexdigest()


def test_each_rank_hashes_a_balanced_share_largest_first():
    sizes = {"a": 100, "b": 60, "c": 50, "d": 10, "e": 0}
    shares = [ckpt._my_share(sizes, r, 2) for r in range(2)]
    assert shares == [["a", "d", "e"], ["b", "c"]]  # loads 101, 61; 112 (c); 112 (d); tie -> rank 0
    assert ckpt._my_share({"x": 0, "y": 0}, 1, 2) == ["y"]  # empty files still spread over ranks
    assert ckpt._my_share(sizes, 0, 1) == ["a", "b", "c", "d", "e"]


def test_disk_full_is_found_in_wrapped_errors():
    assert ckpt._disk_full(OSError(errno.EDQUOT, "quota"))
    assert not ckpt._disk_full(OSError(errno.EIO, "io")) and not ckpt._disk_full(None)
    assert ckpt._disk_full(RuntimeError("write failed: No space left on device"))
    assert ckpt._disk_full(RuntimeError("Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "full")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert ckpt._disk_full(outer)
    wrapped = RuntimeError("rank failures")
    wrapped.failures = {0: OSError(errno.ENOSPC, "x")}
    assert ckpt._disk_full(wrapped)
    holder = RuntimeError("holder")
    holder.exc = OSError(errno.ENOSPC, "x")
    assert ckpt._disk_full(holder)
    looped = RuntimeError("a")
    looped.__context__ = looped
    assert not ckpt._disk_full(looped)


def test_writer_records_and_liveness(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    rec = ckpt.writer_record("tok")
    assert (rec["host"], rec["pid"], rec["job"], rec["attempt"], rec["token"]) == \
        (socket.gethostname(), os.getpid(), "77", "2", "tok")
    assert rec["start"] == ckpt._proc_start(os.getpid()) and rec["start"] is not None
    assert len(ckpt.writer_record()["token"]) == 32
    assert ckpt.describe(None) == "an unknown process"
    assert ckpt.describe({"host": "h", "pid": 3, "job": "77", "since": "t"}) == "host h pid 3, Slurm job 77 (since t)"
    assert ckpt.describe({"host": "h", "pid": 3, "since": "t"}) == "host h pid 3 (since t)"
    parent = {"host": socket.gethostname(), "pid": os.getppid(), "start": ckpt._proc_start(os.getppid())}
    assert ckpt._alive_on_this_host(parent)
    assert not ckpt._alive_on_this_host({**parent, "start": parent["start"] + 1})  # pid reused
    assert not ckpt._alive_on_this_host({**parent, "host": "elsewhere"})
    assert not ckpt._alive_on_this_host({**parent, "pid": os.getpid()})  # ourselves
    assert not ckpt._alive_on_this_host({**parent, "pid": str(os.getppid())})
    assert not ckpt._alive_on_this_host(None)
    assert ckpt._proc_start(2 ** 22 + 12345) is None and not ckpt._pid_alive(2 ** 22 + 12345, None)


def test_read_json_gives_objects_only(tmp_path):
    (tmp_path / "a").write_text('{"k": 1}')
    (tmp_path / "b").write_text("[1]")
    (tmp_path / "c").write_text("{")
    assert ckpt._read_json(str(tmp_path / "a")) == {"k": 1}
    assert [ckpt._read_json(str(tmp_path / n)) for n in ("b", "c", "missing")] == [None, None, None]
