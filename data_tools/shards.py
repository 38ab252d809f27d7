"""Per-shard outputs (``--shard-outputs``): each input file becomes its own dataset under
``<output-prefix>_shards/``, named by the file's position in the input list
(``00003_text_document.bin/.idx``), and a completion marker
(``00003_text_document.done.json``) written after the dataset is in place.

A rerun skips every shard whose marker matches (same input file: path, size and
modification time; same tokenizer bytes and reading settings), so a killed run resumes
where it stopped; a marker that does not match is an error (or, with ``--overwrite``,
the shard is redone). Shards can be split over several processes or array tasks
(``task_index`` of ``task_count``, round-robin). When every shard has its marker, the
shards are merged in input order into ``<output-prefix>_<key>_document``
(``merge.merge_datasets``); a shard that had no documents has a marker but no dataset.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import List, Optional

from .work import Shard


def _sha256(path: str) -> str:
    """Of a file, or of every file in a folder (a tokenizer folder), names included."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    for name in files:
        h.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class ShardOutputs:
    """Names, markers and resume decisions for the shards of one run."""

    def __init__(self, cfg, shards: List[Shard]):
        self.cfg = cfg
        self.directory = f"{cfg.output_prefix}_shards"
        self.width = max(5, len(str(len(shards) - 1)))
        self.shards = shards
        level = "sentence" if cfg.split_sentences else "document"
        self.suffix = f"_{cfg.json_key}_{level}"
        self.settings = {"tokenizer_sha256": _sha256(cfg.tokenizer_model), "key": cfg.json_key,
                         "text_mode": cfg.text_mode, "split_sentences": cfg.split_sentences,
                         "input_format": cfg.input_format}

    def prefix(self, shard: Shard) -> str:
        return os.path.join(self.directory, f"{shard.index:0{self.width}d}{self.suffix}")

    def marker(self, shard: Shard) -> str:
        return self.prefix(shard) + ".done.json"

    def mine(self, task_index: int, task_count: int) -> List[Shard]:
        """This task's shards (round-robin over the input list)."""
        return [s for s in self.shards if s.index % task_count == task_index]

    def _identity(self, shard: Shard) -> dict:
        st = os.stat(shard.path)
        return {"input": os.path.abspath(shard.path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "settings": self.settings}

    def read_marker(self, shard: Shard) -> Optional[dict]:
        try:
            with open(self.marker(shard), encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: not a match

    def is_done(self, shard: Shard) -> bool:
        """True when the shard's marker matches its input and settings (skip it)."""
        marker = self.read_marker(shard)
        if marker is None:
            return False
        want = self._identity(shard)
        got = {k: marker.get(k) for k in want}
        dataset = self._dataset(marker)
        complete = dataset is None or all(os.path.isfile(dataset + ext) for ext in (".bin", ".idx"))
        if got == want and complete:
            return True
        if self.cfg.overwrite:
            os.remove(self.marker(shard))
            return False
        differs = [k for k in want if got[k] != want[k]] or ["its dataset files are missing"]
        raise ValueError(f"{self.marker(shard)} was written for another input or settings "
                         f"({', '.join(differs)} differ from {shard.path}); use a new --output-prefix "
                         "or pass --overwrite to redo such shards")

    def start(self, shard: Shard) -> str:
        """Prepare to write a shard: its directory, no stale partial files from a killed run."""
        os.makedirs(self.directory, exist_ok=True)
        prefix = self.prefix(shard)
        for stale in glob.glob(glob.escape(prefix) + ".*.partial-*"):
            os.remove(stale)
        return prefix

    def finish(self, shard: Shard, dataset: Optional[str], counts: dict) -> None:
        """Write the marker (after the dataset is in place): the shard is done."""
        name = os.path.basename(dataset) if dataset else None  # relative: the folder may move
        record = {**self._identity(shard), "dataset": name, **counts}
        tmp = self.marker(shard) + f".partial-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.marker(shard))

    def _dataset(self, marker: dict) -> Optional[str]:
        name = marker.get("dataset")
        return os.path.join(self.directory, name) if name else None

    def missing(self) -> List[Shard]:
        """Shards of the whole run without a matching marker."""
        return [s for s in self.shards if not self.is_done(s)]

    def merge(self, output: str) -> dict:
        """Merge every shard's dataset, in input order, into ``output``."""
        from .merge import merge_datasets

        missing = self.missing()
        if missing:
            raise ValueError(f"cannot merge: {len(missing)} of {len(self.shards)} shards are not finished "
                             f"(first: {missing[0].path}); run the tasks that own them first")
        datasets = [d for d in map(self._dataset, map(self.read_marker, self.shards)) if d]
        if not datasets:
            raise ValueError(f"no documents in any of the {len(self.shards)} shards; nothing to merge")
        return merge_datasets(datasets, output, overwrite=self.cfg.overwrite)
