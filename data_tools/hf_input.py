"""Hugging Face ``datasets`` input: a ``save_to_disk`` folder (``load_from_disk``) or
anything ``load_dataset`` opens (a hub name where the network allows, a local folder of
data files, a builder such as ``json`` with ``data_files``), optionally streaming.

The reading process takes rows in batches of about one chunk of text (Arrow batches for
a map-style dataset, examples for a streaming one) and hands them to the tokenizer
workers; rows are numbered from 0 (``ds[row]``) in reports. Nulls and non-strings in the
text column are bad documents (``field_not_string``), as in parquet.
"""
from __future__ import annotations

import os
from typing import Iterator, List, Optional, Tuple

from .inputs import FIELD_NOT_STRING, Problem
from .parquet_input import Rows, rows_of

_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


def _datasets():
    try:
        import datasets
    except ImportError:
        raise ValueError("--hf-dataset needs the datasets package: pip install 'kla-megatron[data]'") from None
    return datasets


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def is_saved_dataset(path: str) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, m)) for m in _DISK_MARKERS)


def load(name: str, split: str = "train", config: Optional[str] = None, data_files: Optional[List[str]] = None,
         streaming: bool = False):
    """The dataset of one split, map-style or (``streaming``) iterable; errors are one line."""
    datasets = _datasets()
    try:
        if is_saved_dataset(name):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, config, split=split, data_files=data_files or None, streaming=streaming)
    except Exception as e:  # missing files, no network, unknown builder: say which and why
        raise ValueError(f"--hf-dataset {name!r} could not be loaded: {_one_line(e)}") from None
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in ds:
            raise ValueError(f"--hf-dataset {name!r} has no split {split!r} (splits: {', '.join(ds)}); "
                             "choose one with --hf-split")
        ds = ds[split]
    return ds


def label(name: str, split: str) -> str:
    """How reports name the dataset: ``name[split]``."""
    return f"{name}[{split}]"


def check_column(ds, name: str, column: str) -> None:
    names = ds.column_names
    if names is not None and column not in names:
        raise ValueError(f"--hf-dataset {name!r} has no column {column!r} (columns: {', '.join(names)}); "
                         "choose one with --text-column")


def total_bytes(ds, column: str) -> Optional[int]:
    """Arrow bytes of the text column of a map-style dataset (the progress total); None when streaming."""
    return ds.select_columns([column]).data.nbytes if hasattr(ds, "data") else None


def iter_batches(ds, where: str, column: str, chunk_bytes: int) -> Iterator[Tuple[Rows, int]]:
    """``(rows, bytes read)`` in batches of about ``chunk_bytes`` of text, in row order."""
    if hasattr(ds, "data"):
        yield from _map_style(ds, where, column, chunk_bytes)
    else:
        yield from _streaming(ds, where, column, chunk_bytes)


def _map_style(ds, where: str, column: str, chunk_bytes: int):
    ds = ds.select_columns([column])
    per_row = max(ds.data.nbytes // max(len(ds), 1), 1)
    row = 0
    for table in ds.with_format("arrow").iter(batch_size=max(chunk_bytes // per_row, 1)):
        yield rows_of(table.column(column), row, where, column), table.nbytes
        row += table.num_rows


def _streaming(ds, where: str, column: str, chunk_bytes: int):
    docs, problems, size = [], [], 0
    for row, example in enumerate(ds):
        value = example.get(column)
        if isinstance(value, str):
            # surrogatepass: a lone surrogate reaches the worker as invalid UTF-8 and is reported there
            raw = value.encode("utf-8", "surrogatepass")
            docs.append((row, raw))
            size += len(raw)
        else:
            what = "is null" if value is None else f"is {type(value).__name__}, expected a string"
            problems.append(Problem(where, row, FIELD_NOT_STRING, f"column {column!r} {what}", unit="row"))
        if size >= chunk_bytes:
            yield (docs, problems), size
            docs, problems, size = [], [], 0
    if docs or problems:
        yield (docs, problems), size
