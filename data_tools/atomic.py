"""Write-then-rename for indexed datasets, so no interrupted run leaves a dataset that
looks complete.

A dataset is the pair ``<prefix>.bin`` + ``<prefix>.idx``; readers need both. We write
``<prefix>.bin.partial-<pid>`` and ``<prefix>.idx.partial-<pid>`` (names no reader or
``*.bin`` glob mistakes for a dataset), then rename the ``.bin`` and, last, the ``.idx``.
An existing ``.idx`` is removed before the new ``.bin`` lands, so an old index is never
paired with new data.
"""
from __future__ import annotations

import os
from typing import Tuple


def partial_paths(prefix: str) -> Tuple[str, str]:
    return f"{prefix}.bin.partial-{os.getpid()}", f"{prefix}.idx.partial-{os.getpid()}"


def check_output_free(prefix: str, overwrite: bool) -> None:
    existing = [p for p in (prefix + ".bin", prefix + ".idx") if os.path.exists(p)]
    if existing and not overwrite:
        raise ValueError(f"output {existing[0]} already exists; pass --overwrite to replace it")


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_dataset(tmp_bin: str, tmp_idx: str, prefix: str) -> None:
    """Move a finished dataset into place; the ``.idx`` appears last."""
    for p in (tmp_bin, tmp_idx):
        _fsync(p)  # data on disk before the names say it is complete
    if os.path.exists(prefix + ".idx"):
        os.remove(prefix + ".idx")
    os.replace(tmp_bin, prefix + ".bin")
    os.replace(tmp_idx, prefix + ".idx")


def remove_partials(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.remove(p)
