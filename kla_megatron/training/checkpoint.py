"""Checkpoint directories: atomic publication, discovery of the latest complete one, retention.

Layout under ``checkpoint.dir``::

    iter_0000200/            a complete checkpoint
        model/               the engine's checkpoint (megatron torch_dist, or DeepSpeed's)
        rng/rank_00000.pt    per-rank RNG states (used when resuming on the same layout)
        manifest.json        written last: step, layout and the size of every file
    iter_0000300.tmp/        being written (or left by a crash): never resumed from

Every rank writes into ``iter_N.tmp``; after a barrier rank 0 writes the manifest and renames
the directory to ``iter_N``. A crash at any point leaves the previous checkpoint untouched,
and a checkpoint whose files do not match its manifest (truncated, deleted) is skipped with
a warning, falling back to the one before.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings

import numpy
import torch
import torch.distributed as dist
import yaml

MANIFEST = "manifest.json"
MODEL_CONFIG = "model_config.yaml"
_ITER_RE = re.compile(r"^iter_(\d{7})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"iter_{step:07d}")


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _file_sizes(path: str) -> dict[str, int]:
    sizes = {}
    for base, _, files in os.walk(path):
        for name in files:
            full = os.path.join(base, name)
            rel = os.path.relpath(full, path)
            if rel != MANIFEST:
                sizes[rel] = os.path.getsize(full)
    return sizes


def begin(root: str, step: int) -> str:
    """Create (on rank 0) and return the temporary directory for the checkpoint of ``step``."""
    tmp = step_dir(root, step) + ".tmp"
    if not dist.is_initialized() or dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
        os.makedirs(os.path.join(tmp, "model"))
        os.makedirs(os.path.join(tmp, "rng"))
    _barrier()
    return tmp


def commit(root: str, step: int, info: dict, keep_last: int) -> str:
    """All ranks have written into the temp dir: publish it atomically, then prune old ones."""
    _barrier()
    final = step_dir(root, step)
    if not dist.is_initialized() or dist.get_rank() == 0:
        tmp = final + ".tmp"
        manifest = {"step": step, **info, "files": _file_sizes(tmp)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):  # re-saving a step (e.g. a resumed run ending where it started)
            shutil.rmtree(final)
        os.rename(tmp, final)
        prune(root, keep_last)
    _barrier()
    return final


def verify(path: str) -> str | None:
    """None if ``path`` is a complete checkpoint, else the reason it is not."""
    manifest_path = os.path.join(path, MANIFEST)
    if not os.path.exists(manifest_path):
        return "no manifest.json (partially written)"
    try:
        with open(manifest_path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        return f"unreadable manifest.json ({exc})"
    actual = _file_sizes(path)
    for rel, size in manifest.get("files", {}).items():
        if rel not in actual:
            return f"missing file {rel}"
        if actual[rel] != size:
            return f"file {rel} has {actual[rel]} bytes, manifest says {size}"
    return None


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of complete checkpoints under ``root``, oldest first; warns about bad ones."""
    if not root or not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        m = _ITER_RE.match(name)
        if not m:
            continue
        path = os.path.join(root, name)
        problem = verify(path)
        if problem:
            warnings.warn(f"skipping checkpoint {path}: {problem}", stacklevel=2)
            continue
        found.append((int(m.group(1)), path))
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
    for _, path in complete_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------- RNG


def rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": numpy.random.get_state(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    numpy.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_model_config(tmp: str, model_config: dict) -> None:
    """``model_config.yaml`` inside the checkpoint (found by ``kla-convert`` without flags)."""
    with open(os.path.join(tmp, MODEL_CONFIG), "w") as f:
        yaml.safe_dump(model_config, f, sort_keys=False)


def save_rng(tmp: str, rank: int) -> None:
    torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{rank:05d}.pt"))


def load_rng(path: str, rank: int) -> bool:
    file = os.path.join(path, "rng", f"rank_{rank:05d}.pt")
    if not os.path.exists(file):
        return False
    set_rng_state(torch.load(file, weights_only=False))
    return True
