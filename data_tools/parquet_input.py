"""Parquet input: one text column, read a row group (or a batch of rows) at a time with
pyarrow, never a whole file.

A row group is the unit of work: a worker process reads it from the file itself, so the
reading process does no parquet decoding. A row group larger than ``STREAM_FACTOR``
chunks is instead streamed by the reader in batches of about one chunk, so memory stays
bounded by the chunk size even for files written as one huge row group. Either way the
documents, their order and so the output are the same.

Rows are numbered from 0 in the file (``pandas.read_parquet(f).iloc[row]``). A null or a
value that is not a string is a bad document (``field_not_string``) at ``file:row N``;
binary columns are taken as UTF-8 and checked like any text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List, Tuple

from .inputs import FIELD_NOT_STRING, Problem

STREAM_FACTOR = 8
"""Row groups whose text column is larger than this many chunks are streamed in batches."""

Rows = Tuple[List[Tuple[int, bytes]], List[Problem]]
"""``(docs, problems)``: the raw UTF-8 of good rows as ``(row, bytes)``, and the bad rows."""


@dataclass(frozen=True)
class RowGroup:
    """Where one row group is and how big it is."""

    index: int
    first_row: int
    num_rows: int
    text_bytes: int  # uncompressed size of the text column
    disk_bytes: int  # its share of the file on disk (all columns; the footer with the last)


def _pq():
    import pyarrow.parquet as pq

    return pq


def open_parquet(path: str, column: str):
    """``ParquetFile`` of ``path``; a missing column is a one-line error naming the others."""
    try:
        pf = _pq().ParquetFile(path, buffer_size=1 << 20)
    except Exception as e:  # ArrowInvalid: truncated or not parquet
        raise ValueError(f"input {path} is not a readable parquet file: {e}") from None
    names = pf.schema_arrow.names
    if column not in names:
        listing = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
        raise ValueError(f"parquet input {path} has no column {column!r} (columns: {listing}); "
                         f"choose one with --text-column")
    return pf


def row_groups(pf, column: str, size: int) -> List[RowGroup]:
    """The row groups of an open file, in order, with their sizes (from the footer)."""
    md = pf.metadata
    col = pf.schema_arrow.names.index(column)
    # Leaf index of the column: equal to the field index for flat schemas; nested columns
    # have several leaves, so look it up by its path.
    leaf = next((j for j in range(md.num_columns) if md.schema.column(j).path.split(".")[0] == column), col)
    groups, first, used = [], 0, 0
    for i in range(md.num_row_groups):
        rg = md.row_group(i)
        disk = sum(rg.column(j).total_compressed_size for j in range(rg.num_columns))
        if i == md.num_row_groups - 1:
            disk = max(size - used, 0)
        groups.append(RowGroup(i, first, rg.num_rows, rg.column(leaf).total_uncompressed_size, disk))
        first += rg.num_rows
        used += disk
    return groups


def rows_of(array, first_row: int, path: str, column: str) -> Rows:
    """Good rows as raw UTF-8 and bad rows as problems, from one Arrow array of a column."""
    import pyarrow as pa

    t = array.type
    if pa.types.is_dictionary(t):  # (chunked arrays have no dictionary_decode)
        array, t = array.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or getattr(pa.types, "is_string_view", bool)(t):
        values = array.cast(pa.large_binary() if pa.types.is_large_string(t) else pa.binary()).to_pylist()
    elif pa.types.is_binary(t) or pa.types.is_large_binary(t):
        values = array.to_pylist()
    else:  # numbers, lists, structs: every value is bad
        nulls = array.is_null().to_pylist()
        return [], [Problem(path, first_row + i, FIELD_NOT_STRING,
                            f"column {column!r} is null" if null else f"column {column!r} holds {t}, expected strings",
                            unit="row") for i, null in enumerate(nulls)]
    docs, problems = [], []
    for i, v in enumerate(values):
        if v is None:
            problems.append(Problem(path, first_row + i, FIELD_NOT_STRING, f"column {column!r} is null", unit="row"))
        else:
            docs.append((first_row + i, v))
    return docs, problems


_OPEN: dict = {}  # one open file per worker process: consecutive row groups share it


def _cached(path: str, column: str):
    if _OPEN.get("path") != path:
        _OPEN.clear()
        _OPEN.update(path=path, pf=open_parquet(path, column))
    return _OPEN["pf"]


def close_cached() -> None:
    _OPEN.clear()


def read_row_group(path: str, group: int, first_row: int, column: str) -> Rows:
    """All rows of one row group (what a worker reads for a row-group work item)."""
    table = _cached(path, column).read_row_group(group, columns=[column], use_threads=False)
    return rows_of(table.column(0), first_row, path, column)


def iter_row_batches(pf, path: str, group: RowGroup, column: str, chunk_bytes: int) -> Iterator[Tuple[Rows, int]]:
    """A large row group in batches of about ``chunk_bytes`` of text; yields ``(rows, text bytes)``."""
    per_row = max(group.text_bytes // max(group.num_rows, 1), 1)
    batch_rows = max(chunk_bytes // per_row, 1)
    row = group.first_row
    for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group.index], columns=[column], use_threads=False):
        array = batch.column(0)
        yield rows_of(array, row, path, column), array.nbytes
        row += len(array)


def is_streamed(group: RowGroup, chunk_bytes: int) -> bool:
    return group.text_bytes > STREAM_FACTOR * chunk_bytes


def iter_parquet_rows(path: str, column: str = "text") -> Iterator[Tuple[int, bytes]]:
    """``(row, raw UTF-8)`` of every non-null string row, for callers that only sample text
    (tokenizer training); nulls and non-strings are left out here, not reported."""
    import os

    pf = open_parquet(path, column)
    for group in row_groups(pf, column, os.path.getsize(path)):
        for (docs, _), _ in iter_row_batches(pf, path, group, column, 1 << 20):
            yield from docs

