"""Checkpoint directories: atomic publication, verification, safe loading, a per-directory run lock.

Layout under ``checkpoint.dir``::

    .lock                    the run lock (host, pid, job of the run writing here; see RunLock)
    iter_0000200/            a complete checkpoint
        model/               the engine's checkpoint (megatron torch_dist, or DeepSpeed's)
        rng/rank_00000.pt    per-rank RNG states as plain tensors and numbers (weights_only)
        writer.json          who wrote it (host, pid, Slurm job)
        manifest.json        written last: step, layout, the size and checksum of every file
    iter_0000300.tmp/        being written (or left by a crash): never resumed from

Every rank writes into ``iter_N.tmp``; after a barrier the ranks checksum the files (xxh3-64
when ``xxhash`` is installed, else zlib's crc32; each rank hashes a share), rank 0 writes the
manifest and renames the directory to ``iter_N``. A crash at any point leaves the previous
checkpoint untouched. A failed save (a full disk included) removes its ``.tmp`` on every rank's
agreement and raises :class:`DiskFullError` or the original error.

Before resuming from a checkpoint, :func:`check` verifies it: every file has its manifest size
and checksum, and nothing in it can run code when loaded: the RNG files (loaded with
``weights_only=True``), ``common.pt`` and the byte items of the torch_dist shards (which torch
unpickles with ``weights_only=False``) may refer to nothing beyond weights_only's allowlist, and
``.metadata``, a raw pickle, must unpickle with an unpickler that admits only
torch.distributed.checkpoint's metadata classes, torch.Size and dtypes. The trainer skips a checkpoint that fails a check or fails to load, with one line
saying why, and resumes from the next older one.
"""
from __future__ import annotations

import dataclasses
import enum
import errno
import importlib
import io
import json
import os
import pickle
import random
import re
import shutil
import socket
import threading
import time
import uuid
import warnings
import zlib

import numpy
import torch
import torch.distributed as dist

try:
    import xxhash
except ImportError:  # optional: zlib's crc32 is the fallback
    xxhash = None

MANIFEST = "manifest.json"
WRITER = "writer.json"
LOCK = ".lock"
CHECKSUM = "xxh3_64" if xxhash is not None else "crc32"
"""The checksum algorithm new manifests use."""
_ITER_RE = re.compile(r"^iter_(\d{7})$")

# Exit codes of kla-pretrain, per cause (the table is in launch/README.md).
EXIT_NO_LOADABLE_CHECKPOINT = 3
EXIT_DISK_FULL = 4
EXIT_LOCKED = 5


class CheckpointError(RuntimeError):
    """No checkpoint can be loaded (``checkpoint.resume`` unusable, or every one in the dir fails)."""

    exit_code = EXIT_NO_LOADABLE_CHECKPOINT


class DiskFullError(CheckpointError):
    """No space (or quota) left while saving; the partial save was removed."""

    exit_code = EXIT_DISK_FULL


class CheckpointLockedError(CheckpointError):
    """Another run holds ``checkpoint.dir`` (or is writing a ``.tmp`` in it)."""

    exit_code = EXIT_LOCKED


CAUGHT: tuple[type[BaseException], ...] = (Exception,)
"""What a failed save or load may raise: torch.distributed.checkpoint's CheckpointException
derives from BaseException, not Exception."""
try:
    from torch.distributed.checkpoint.api import CheckpointException as _DcpError

    CAUGHT = (Exception, _DcpError)
except ImportError:
    pass


class CheckpointWarning(UserWarning):
    """A notice about checkpoints (skipped, lock taken over, partial save removed)."""


warnings.filterwarnings("always", category=CheckpointWarning)


def notice(msg: str) -> None:
    """One line for the user (kla-pretrain prints these as plain lines)."""
    warnings.warn(msg, CheckpointWarning, stacklevel=2)


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


# ---------------------------------------------------------------- collectives (no-ops without a group)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _bcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def one_line(exc: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        return lines[-1][:limit]  # an error carrying a remote traceback (torch.distributed.checkpoint): its last line
    text = " ".join(lines) or "(no message)"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}"


# ---------------------------------------------------------------- files, checksums


def _file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for base, _, files in os.walk(path):
        for name in files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, path)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(full)
    return sizes


class _Crc32:
    def __init__(self):
        self.value = 0

    def update(self, data) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _hasher(algo: str):
    if algo == "xxh3_64" and xxhash is not None:
        return xxhash.xxh3_64()
    if algo == "crc32":
        return _Crc32()
    return None


def file_checksum(path: str, algo: str = CHECKSUM) -> str:
    h = _hasher(algo)
    if h is None:
        raise ValueError(f"checksum algorithm {algo} is not available (pip install xxhash)")
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(min(8 << 20, max(1 << 16, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _my_share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """This rank's files to hash: largest first, each to the least-loaded rank (same on every rank)."""
    load = [0] * world
    mine = []
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        r = load.index(min(load))
        load[r] += sizes[rel] + 1
        if r == rank:
            mine.append(rel)
    return mine


def _checksums(path: str, sizes: dict[str, int], algo: str) -> tuple[dict[str, str], str | None]:
    """Collective: checksums of ``sizes``' files under ``path`` (each rank hashes a share)."""
    rank, world = _rank_world()
    sums, error = {}, None
    try:
        for rel in _my_share(sizes, rank, world):
            sums[rel] = file_checksum(os.path.join(path, rel), algo)
    except OSError as exc:
        error = f"{rel}: {one_line(exc)}"
    merged, errors = {}, []
    for part, err in _gather((sums, error)):
        merged.update(part)
        if err:
            errors.append(err)
    return merged, (errors[0] if errors else None)


def _dir_bytes(path: str) -> int:
    try:
        return sum(_file_sizes(path).values())
    except OSError:
        return 0


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


# ---------------------------------------------------------------- who writes (lock records)


def _proc_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart), if known."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start is not None:
        now = _proc_start(pid)
        if now is not None and now != start:
            return False  # the pid belongs to another process now
    return True


def writer_record(token: str | None = None) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _proc_start(pid),
            "job": os.environ.get("SLURM_JOB_ID"), "attempt": os.environ.get("SLURM_RESTART_COUNT"),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), "token": token or uuid.uuid4().hex}


def describe(record: dict | None) -> str:
    if not record:
        return "an unknown process"
    job = f", Slurm job {record['job']}" if record.get("job") else ""
    return f"host {record.get('host')} pid {record.get('pid')}{job} (since {record.get('since')})"


def _alive_on_this_host(record: dict | None) -> bool:
    return bool(record) and record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int) \
        and record["pid"] != os.getpid() and _pid_alive(record["pid"], record.get("start"))


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- saving


def _disk_full(exc: BaseException | None) -> bool:
    """Is ``exc`` (or anything it wraps) ENOSPC / EDQUOT?"""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        todo += [e.__cause__, e.__context__, getattr(e, "exc", None)]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            for f in failures.values():
                inner = getattr(f, "exc", f)
                if isinstance(inner, BaseException):
                    todo.append(inner)
    return False


def _out_of_space(where: str) -> bool:
    """Does writing 1 MiB (and fsync) under ``where`` fail with ENOSPC/EDQUOT? Megatron's writer
    processes and torch's C++ writer report a full disk without its errno ("unexpected pos ...")."""
    probe = os.path.join(where, f".space_probe_{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(bytes(1 << 20))
            f.flush()
            os.fsync(f.fileno())
        return False
    except OSError as exc:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def _failure(exc: BaseException, root: str, step: int) -> dict:
    """What a rank reports about its failed save: one line, and whether the disk is full."""
    tmp = step_dir(root, step) + ".tmp"
    text = one_line(exc)
    full = _disk_full(exc)
    if not full and _out_of_space(tmp if os.path.isdir(tmp) else root):
        full, text = True, f"{text}; a 1 MiB test write there fails with ENOSPC/EDQUOT"
    return {"disk_full": full, "text": text}


def _abort_save(root: str, step: int, failures: list, own: BaseException | None):
    """Every rank: remove the partial save, then raise DiskFullError (or the failure)."""
    rank, _ = _rank_world()
    tmp = step_dir(root, step) + ".tmp"
    message = None
    if rank == 0:
        written = _dir_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = [os.path.basename(p) for _, p in complete_checkpoints(root, warn=False)]
        need = ""
        if kept:
            try:
                prev = sum(read_manifest(os.path.join(root, kept[-1]))["files"].values())
                need = f"a checkpoint needs about {_fmt_bytes(prev)} (the size of {kept[-1]}), "
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                pass
        try:
            free = f"{_fmt_bytes(shutil.disk_usage(root).free)} free"
        except OSError:
            free = "free space unknown"
        message = (f"{need}{_fmt_bytes(written)} were written before it failed, {free}; partial save removed, "
                   f"earlier checkpoints kept: {', '.join(kept) or 'none'}")
    message = _bcast(message)
    _barrier()
    disk = [f for f in failures if f and f["disk_full"]]
    if disk:
        raise DiskFullError(f"no space left on device while saving checkpoint {step_dir(root, step)} "
                            f"({disk[0]['text']}); {message}") from own
    if own is not None:
        raise own
    first = next(f for f in failures if f)
    raise RuntimeError(f"saving checkpoint {step_dir(root, step)} failed (partial save removed): {first['text']}")


def begin(root: str, step: int, lock: "RunLock | None" = None) -> str:
    """Create (on rank 0) and return the temporary directory for the checkpoint of ``step``.

    A leftover ``iter_N.tmp`` is removed only if its writer is not a live process on this host
    (a live one raises CheckpointLockedError); with ``lock``, rank 0 first checks it still owns
    the directory."""
    tmp = step_dir(root, step) + ".tmp"
    rank, _ = _rank_world()
    failure = own = None
    if rank == 0:
        try:
            if lock is not None:
                lock.check()
            if os.path.exists(tmp):
                owner = _read_json(os.path.join(tmp, WRITER))
                if _alive_on_this_host(owner):
                    raise CheckpointLockedError(f"{tmp} is being written by {describe(owner)}, a live process "
                                                f"(another run on this checkpoint.dir?); not removing it")
                notice(f"removing partial checkpoint {tmp} left by {describe(owner)}")
                shutil.rmtree(tmp)
            os.makedirs(os.path.join(tmp, "model"))
            os.makedirs(os.path.join(tmp, "rng"))
            with open(os.path.join(tmp, WRITER), "w") as f:
                json.dump(lock.record if lock is not None else writer_record(), f)
        except CheckpointLockedError as exc:
            failure = {"locked": str(exc)}
        except CAUGHT as exc:
            failure, own = _failure(exc, root, step), exc
    failure = _bcast(failure)
    if failure and "locked" in failure:
        raise CheckpointLockedError(failure["locked"])
    if failure:
        _abort_save(root, step, [failure], own)
    _barrier()
    return tmp


def finish_writes(root: str, step: int, exc: BaseException | None) -> None:
    """Collective, after every rank wrote its part: if any rank failed, remove the partial save and
    raise on every rank (DiskFullError for a full disk, else the failing rank's error)."""
    failures = _gather(_failure(exc, root, step) if exc is not None else None)
    if any(failures):
        _abort_save(root, step, failures, exc)


def commit(root: str, step: int, info: dict, keep_last: int) -> str:
    """All ranks have written into the temp dir: checksum, publish it atomically, prune old ones."""
    _barrier()
    final = step_dir(root, step)
    tmp = final + ".tmp"
    rank, _ = _rank_world()
    sizes = _bcast(_file_sizes(tmp) if rank == 0 else None)
    sums, error = _checksums(tmp, sizes, CHECKSUM)
    failure = {"disk_full": False, "text": error} if error else None
    own = old = None
    if rank == 0 and failure is None:
        try:
            manifest = {"step": step, **info, "files": sizes, "checksum": CHECKSUM,
                        "checksums": {rel: sums[rel] for rel in sizes}}
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):  # re-saving a step (a run restarted before this step's checkpoint)
                old = final + ".replaced"
                shutil.rmtree(old, ignore_errors=True)
                os.rename(final, old)
            os.rename(tmp, final)
            _fsync_dir(root)
            if old:
                shutil.rmtree(old, ignore_errors=True)
        except CAUGHT as exc:
            failure, own = _failure(exc, root, step), exc
            if old and not os.path.exists(final):
                os.rename(old, final)  # put the replaced checkpoint back
    failure = _bcast(failure)
    if failure:
        _abort_save(root, step, [failure], own)
    if rank == 0:
        prune(root, keep_last)
    _barrier()
    return final


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- finding and checking checkpoints


def incomplete_reason(path: str) -> str | None:
    """None if ``path`` is a complete checkpoint (every file there with its manifest size), else
    the reason it is not. Cheap: :func:`check` also compares checksums and contents."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return "no manifest.json (partially written)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
        files = manifest.get("files", {})
        actual = _file_sizes(path)
        for rel, size in files.items():
            if rel not in actual:
                return f"missing file {rel}"
            if actual[rel] != size:
                return f"file {rel} has {actual[rel]} bytes, manifest says {size}"
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return f"unreadable manifest.json ({one_line(exc)})"
    return None


def verify_checksums(path: str) -> str | None:
    """Collective: None if every file matches its manifest checksum (or the manifest has none)."""
    rank, _ = _rank_world()
    manifest = _bcast(_read_json(os.path.join(path, MANIFEST)) if rank == 0 else None) or {}
    sums, algo = manifest.get("checksums"), manifest.get("checksum")
    if not isinstance(sums, dict) or not sums:
        return None  # written before checksums: sizes only
    if _hasher(str(algo)) is None:
        if rank == 0:
            notice(f"cannot verify the {algo} checksums of {path} ({algo} is not available: pip install xxhash)")
        return None
    actual, error = _checksums(path, {rel: manifest["files"].get(rel, 0) for rel in sums}, algo)
    if error:
        return f"unreadable file {error}"
    for rel in sorted(sums):
        if actual.get(rel) != sums[rel]:
            return (f"file {rel} is corrupt (its {algo} checksum {actual.get(rel)} differs from the "
                    f"manifest's {sums[rel]})")
    return None


def check(path: str) -> str | None:
    """Collective: None if ``path`` can be loaded safely, else the reason (one line): complete,
    checksums match, and no pickle in it refers to anything beyond plain data."""
    rank, _ = _rank_world()
    problem = _bcast(incomplete_reason(path) if rank == 0 else None)
    if problem is None:
        problem = verify_checksums(path)
    if problem is None:
        problem = _bcast(audit(path) if rank == 0 else None)
    return problem


def candidates(root: str) -> list[tuple[int, str]]:
    """(step, path) of every published ``iter_N`` under ``root``, newest first, unchecked."""
    if not root or not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root)
             if (m := _ITER_RE.match(name))]
    return sorted(found, reverse=True)


def complete_checkpoints(root: str, warn: bool = True) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints under ``root``, oldest first; warns about bad ones."""
    found = []
    for step, path in candidates(root):
        problem = incomplete_reason(path)
        if problem:
            if warn:
                warnings.warn(f"skipping checkpoint {path}: {problem}", CheckpointWarning, stacklevel=2)
            continue
        found.append((step, path))
    return sorted(found)


def latest(root: str) -> str | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def read_manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def prune(root: str, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in complete_checkpoints(root, warn=False)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- loading without running code

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_PLAIN_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


def _allowed_global(module: str, name: str):
    """What a torch_dist ``.metadata`` pickle may refer to: its dataclasses and enums, torch.Size,
    dtypes and layouts. Anything else (os.system, builtins.eval, ...) could run code."""
    if (module, name) in _PLAIN_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    if module in _DCP_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
    raise _Refused(f"it refers to {module}.{name}")


class _Refused(pickle.UnpicklingError):
    """A global outside the allowlist (as opposed to a damaged pickle)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        return _allowed_global(module, name)


def _unsafe_globals(data) -> list[str]:
    """Globals a torch.save file (path or file object) refers to beyond weights_only's allowlist."""
    return list(torch.serialization.get_unsafe_globals_in_checkpoint(data))


def _legacy_numpy_globals() -> list:
    """RNG files written before plain-data RNG states held numpy's MT19937 key array."""
    core = getattr(numpy, "_core", None) or numpy.core
    out = [core.multiarray._reconstruct, numpy.ndarray, numpy.dtype]
    dtypes = getattr(numpy, "dtypes", None)
    if dtypes is not None and hasattr(dtypes, "UInt32DType"):
        out.append(dtypes.UInt32DType)
    return out


_LEGACY_RNG_GLOBALS = {"numpy._core.multiarray._reconstruct", "numpy.core.multiarray._reconstruct",
                       "numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"}


def _audit_torch_file(path: str, rel: str, allowed: frozenset = frozenset()) -> str | None:
    try:
        unsafe = [g for g in _unsafe_globals(path) if g not in allowed]
    except Exception as exc:
        return f"file {rel} is not a readable torch file ({one_line(exc)})"
    if unsafe:
        return f"file {rel} refused: it refers to {', '.join(sorted(unsafe))}, which could run code when loaded"
    return None


def _audit_metadata(model_dir: str, rel_dir: str) -> str | None:
    rel = os.path.join(rel_dir, ".metadata")
    try:
        with open(os.path.join(model_dir, ".metadata"), "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except _Refused as exc:
        return f"file {rel} refused: {exc}, which could run code when loaded"
    except Exception as exc:
        return f"file {rel} is unreadable ({one_line(exc)})"
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    # Non-tensor items are torch.save payloads inside the .distcp files, which torch loads with
    # weights_only=False: check each of them.
    sd_meta, storage = getattr(meta, "state_dict_metadata", None), getattr(meta, "storage_data", None)
    if not isinstance(sd_meta, dict) or not isinstance(storage, dict):
        return f"file {rel} is not torch_dist metadata"
    byte_fqns = {k for k, v in sd_meta.items() if isinstance(v, BytesStorageMetadata)}
    for index, info in storage.items():
        if getattr(index, "fqn", None) not in byte_fqns:
            continue
        item_rel = os.path.join(rel_dir, str(info.relative_path))
        if getattr(info, "transform_descriptors", None):
            return (f"file {item_rel}: item {index.fqn} is stored transformed ({info.transform_descriptors}); "
                    "cannot check it")
        try:
            with open(os.path.join(model_dir, info.relative_path), "rb") as f:
                f.seek(info.offset)
                data = f.read(info.length)
            unsafe = _unsafe_globals(io.BytesIO(data))
        except Exception as exc:
            return f"file {item_rel}: item {index.fqn} is unreadable ({one_line(exc)})"
        if unsafe:
            return (f"file {item_rel} refused: item {index.fqn} refers to {', '.join(sorted(unsafe))}, "
                    "which could run code when loaded")
    return None


def audit(path: str) -> str | None:
    """None if no pickle in checkpoint ``path`` can run code when loaded, else the reason.

    Covers what the trainer and megatron load with pickle: ``rng/*.pt``, ``model/common.pt``,
    ``model/.metadata`` and the byte items of ``model/*.distcp``. (DeepSpeed's own ``.pt`` files
    are not covered: DeepSpeed loads them with weights_only=False.)"""
    model = os.path.join(path, "model")
    if os.path.exists(os.path.join(model, "metadata.json")):
        try:
            with open(os.path.join(model, "metadata.json"), encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as exc:
            return f"file model/metadata.json is not valid JSON ({one_line(exc)})"
    if os.path.exists(os.path.join(model, ".metadata")):
        problem = _audit_metadata(model, "model")
        if problem:
            return problem
    if os.path.exists(os.path.join(model, "common.pt")):
        problem = _audit_torch_file(os.path.join(model, "common.pt"), "model/common.pt")
        if problem:
            return problem
    rng = os.path.join(path, "rng")
    for name in sorted(os.listdir(rng)) if os.path.isdir(rng) else []:
        problem = _audit_torch_file(os.path.join(rng, name), f"rng/{name}", frozenset(_LEGACY_RNG_GLOBALS))
        if problem:
            return problem
    return None


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    """This process's RNG states as plain tensors, numbers and strings (loads with weights_only)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    version, internal, gauss = random.getstate()
    algo, keys, pos, has_gauss, cached = numpy.random.get_state()
    state = {"format": 1,
             "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss},
             "numpy": {"algorithm": str(algo), "keys": torch.from_numpy(keys.astype(numpy.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state(),
             "tracker": {str(k): v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    if state.get("format") == 1:
        py, np_state = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss_next"]))
        numpy.random.set_state((np_state["algorithm"], np_state["keys"].numpy().astype(numpy.uint32),
                                np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    else:  # written before format 1: tuples and a numpy array
        random.setstate(state["python"])
        numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_rng(tmp: str, rank: int) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC), not a bare RuntimeError.
    with open(os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"), "wb") as f:
        torch.save(rng_state(), f)


def load_rng(path: str, rank: int) -> bool:
    file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if not os.path.exists(file):
        return False
    with torch.serialization.safe_globals(_legacy_numpy_globals()):
        state = torch.load(file, weights_only=True)
    set_rng_state(state)
    return True


# ---------------------------------------------------------------- the run lock

HEARTBEAT_SECONDS = float(os.environ.get("KLA_LOCK_HEARTBEAT_SECONDS", "30"))
STALE_SECONDS = float(os.environ.get("KLA_LOCK_STALE_SECONDS", "300"))
"""A lock held from another host whose heartbeat is older than this is taken over (reported)."""


class RunLock:
    """Exclusive hold of a checkpoint directory by one run, for the run's lifetime.

    Rank 0 takes ``fcntl.flock`` on ``<dir>/.lock`` and writes its record there (host, pid,
    process start time, Slurm job, a token); a thread refreshes the file's mtime every
    ``KLA_LOCK_HEARTBEAT_SECONDS`` (30). Another run finds:

    - the flock held (a live run on this host, or on another host where the filesystem shares
      flocks): CheckpointLockedError naming the holder;
    - the flock free and a record from this host: the holder has exited (a crash, kill -9):
      taken over, with a line saying so;
    - the flock free and a record from another host (flocks may be per host): taken over only
      if it is the same Slurm job (a requeued attempt) or its heartbeat is older than
      ``KLA_LOCK_STALE_SECONDS`` (300), with a line saying so; else CheckpointLockedError.

    Where the filesystem has no flock at all, the record decides alone (a live pid on this
    host, or a fresh heartbeat, holds the directory). A clean exit clears the record.
    """

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LOCK)
        self.record = writer_record()
        self.fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- collective entry point

    @classmethod
    def acquire(cls, root: str) -> "RunLock | None":
        """Collective: rank 0 takes the lock (and returns it; other ranks get None); every rank
        raises CheckpointLockedError if it is held."""
        rank, _ = _rank_world()
        lock = message = None
        if rank == 0:
            try:
                lock = cls(root)
                lock._acquire()
            except CheckpointLockedError as exc:
                message = str(exc)
        message = _bcast(message)
        if message:
            raise CheckpointLockedError(message)
        return lock

    # ---- rank 0

    def _read(self) -> dict | None:
        try:
            data = os.pread(self.fd, 1 << 16, 0)
            record = json.loads(data) if data.strip() else None
            return record if isinstance(record, dict) else None
        except (OSError, ValueError):
            return None

    def _heartbeat_age(self) -> float:
        try:
            return max(0.0, time.time() - os.fstat(self.fd).st_mtime)
        except OSError:
            return float("inf")

    def _locked(self, holder: dict | None, extra: str = "") -> CheckpointLockedError:
        return CheckpointLockedError(
            f"checkpoint.dir {self.root} is in use by another run: {describe(holder)}{extra}. Stop that run or "
            f"choose another checkpoint.dir; if that run is dead, delete {self.path}")

    def _acquire(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            has_flock = True
        except BlockingIOError:
            holder = self._read()
            self._close()
            raise self._locked(holder) from None
        except (ImportError, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS,
                                                              errno.EINVAL):
                self._close()
                raise
            has_flock = False  # a filesystem without flock: the record alone decides
        holder = self._read()
        if holder and holder.get("token") != self.record["token"]:
            why = self._stale_because(holder, has_flock)
            if why is None:
                age = self._heartbeat_age()
                self._close()
                raise self._locked(holder, f", heartbeat {age:.0f} s ago")
            notice(f"checkpoint.dir {self.root}: taking over the lock of {describe(holder)}: {why}")
        self._write(self.record)
        self._thread = threading.Thread(target=self._beat, name="kla-lock-heartbeat", daemon=True)
        self._thread.start()

    def _stale_because(self, holder: dict, has_flock: bool) -> str | None:
        """Why ``holder`` no longer holds the directory, or None if it may still."""
        if holder.get("host") == socket.gethostname():
            pid = holder.get("pid")
            if not isinstance(pid, int) or not _pid_alive(pid, holder.get("start")):
                return f"process {pid} has exited"
            if has_flock and pid != os.getpid():
                return f"process {pid} no longer holds the lock"
            if has_flock:
                return "an earlier run of this process did not release it"
            return None
        job = holder.get("job")
        if job and job == os.environ.get("SLURM_JOB_ID"):
            return f"it is an earlier attempt of this Slurm job {job}"
        age = self._heartbeat_age()
        if age > STALE_SECONDS:
            return f"no heartbeat for {age:.0f} s (> KLA_LOCK_STALE_SECONDS={STALE_SECONDS:.0f})"
        return None

    def _write(self, record: dict | None) -> None:
        data = json.dumps(record).encode() if record else b""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.fd)
            except OSError:
                pass

    def check(self) -> None:
        """Raise CheckpointLockedError if the record in the lock file is no longer ours."""
        holder = self._read()
        if not holder or holder.get("token") != self.record["token"]:
            raise CheckpointLockedError(f"lost the lock on checkpoint.dir {self.root} to {describe(holder)}; "
                                        "not saving (two runs on one directory)")

    def _close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # also drops the flock
            self.fd = None

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._read()
            if holder and holder.get("token") == self.record["token"]:
                self._write(None)
        except OSError:
            pass
        self._close()
