"""The work of one preprocess run: its shards (input files, or one Hugging Face dataset),
each cut into work items in document order, and how a worker encodes an item.

Items are consecutive documents of one shard: a block of whole text/JSONL lines that the
worker splits into documents itself (and, from an uncompressed file, reads itself), a chunk
of paragraphs or whole files, a parquet row group that the worker reads itself, or rows
already read (a streamed parquet row group, a Hugging Face dataset). The reading process
does little per document, as it shares the cores with the workers. An item's result
depends only on the item, and items are written in order, so the output is the same for
any number of workers. Each item carries how many bytes of the input on disk it covers,
for progress.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Iterator, List, Optional, Tuple, Union

from .encode import Chunk, EncodedChunk, encode_chunk
from .filetypes import codec_of
from .inputs import Problem, block_documents, check_format, expand_inputs, text_blocks, text_documents
from . import parquet_input


@dataclass(frozen=True)
class Shard:
    """One input of the run: a file, or the Hugging Face dataset (``fmt == "hf"``)."""

    index: int
    path: str
    fmt: str
    size: Optional[int]  # bytes on disk (the progress total); None when unknown (streaming)


@dataclass(frozen=True)
class ShardStart:
    """Marks where a shard's items begin in the stream (never sent to a worker)."""

    shard: Shard


@dataclass
class TextItem:
    chunk: Chunk
    disk_bytes: int


@dataclass
class LinesItem:
    path: str
    fmt: str
    first_line: int
    data: Optional[bytes]  # whole lines as read: one buffer, not a tuple per document
    disk_bytes: int
    offset: int = 0  # data None: the worker reads the size bytes at offset of the (uncompressed) file
    size: int = 0


@dataclass
class RowsItem:
    path: str
    docs: List[Tuple[int, bytes]]  # (row, raw UTF-8)
    problems: List[Problem]  # rows found bad while reading (null, not a string)
    disk_bytes: int


@dataclass
class RowGroupItem:
    path: str
    group: int
    first_row: int
    column: str
    disk_bytes: int


Item = Union[LinesItem, TextItem, RowsItem, RowGroupItem]


# ---------------------------------------------------------------- reading side


def file_shards(patterns: List[str]) -> List[Shard]:
    """Input files in order (globs and directories expanded); formats are checked later."""
    return [Shard(i, p, "", os.path.getsize(p)) for i, p in enumerate(expand_inputs(patterns))]


def check_shard(shard: Shard, input_format: str, column: str) -> Shard:
    """Resolve a file's format from its content; refuse binaries and missing parquet columns."""
    fmt = check_format(shard.path, input_format)
    if fmt == "parquet":
        parquet_input.open_parquet(shard.path, column)
    return replace(shard, fmt=fmt)


def iter_items(shard: Shard, cfg, hf_dataset=None) -> Iterator[Item]:
    """The work items of one shard, in document order."""
    if shard.fmt == "parquet":
        yield from _parquet_items(shard, cfg.json_key, cfg.chunk_bytes)
    elif shard.fmt == "hf":
        from .hf_input import iter_batches

        for (docs, problems), nbytes in iter_batches(hf_dataset, shard.path, cfg.json_key, cfg.chunk_bytes):
            yield RowsItem(shard.path, docs, problems, nbytes)
    elif shard.fmt == "jsonl" or cfg.text_mode == "line":  # a JSONL document is a line in every mode
        yield from _line_items(shard, cfg.chunk_bytes, cfg.workers > 1 and not _compressed(shard.path))
    else:
        yield from _text_items(shard, cfg.text_mode, cfg.chunk_bytes)


def _compressed(path: str) -> bool:
    with open(path, "rb") as f:
        return codec_of(f.read(8)) is not None


def _line_items(shard: Shard, chunk_bytes: int, by_offset: bool) -> Iterator[LinesItem]:
    # by_offset: the worker reads its block again from the page cache, which costs less than
    # sending it through a pipe (this process still reads it, to number the lines)
    with text_blocks(shard.path, chunk_bytes) as (blocks, position):
        done = offset = 0
        for first_line, data in blocks:
            now = position()
            if by_offset:
                yield LinesItem(shard.path, shard.fmt, first_line, None, now - done, offset, len(data))
            else:
                yield LinesItem(shard.path, shard.fmt, first_line, data, now - done)
            done, offset = now, offset + len(data)
    if shard.size > done:  # progress adds up to the file's size
        yield LinesItem(shard.path, shard.fmt, 1, b"", shard.size - done)


def _text_items(shard: Shard, text_mode: str, chunk_bytes: int) -> Iterator[TextItem]:
    with text_documents(shard.path, shard.fmt, text_mode) as (documents, position):
        docs, size, done = [], 0, 0
        for lineno, raw in documents:
            docs.append((lineno, raw))
            size += len(raw)
            if size >= chunk_bytes:
                now = position()
                yield TextItem(Chunk(shard.path, shard.fmt, docs), now - done)
                docs, size, done = [], 0, now
        # the rest of the file, also when it held no more documents (progress adds up to its size)
        yield TextItem(Chunk(shard.path, shard.fmt, docs), max(shard.size - done, 0))


def _parquet_items(shard: Shard, column: str, chunk_bytes: int) -> Iterator[Item]:
    pf = parquet_input.open_parquet(shard.path, column)
    for group in parquet_input.row_groups(pf, column, shard.size):
        if not parquet_input.is_streamed(group, chunk_bytes):
            yield RowGroupItem(shard.path, group.index, group.first_row, column, group.disk_bytes)
            continue
        seen, done = 0, 0
        for (docs, problems), nbytes in parquet_input.iter_row_batches(pf, shard.path, group, column, chunk_bytes):
            seen += nbytes
            now = min(group.disk_bytes * seen // max(group.text_bytes, 1), group.disk_bytes)
            yield RowsItem(shard.path, docs, problems, now - done)
            done = now
        if done < group.disk_bytes:
            yield RowsItem(shard.path, [], [], group.disk_bytes - done)


# ---------------------------------------------------------------- worker side


def encode_item(item: Item) -> EncodedChunk:
    """Decode and tokenize one item (in a worker set up by ``encode.init_worker``)."""
    if isinstance(item, LinesItem):
        data = item.data if item.data is not None else _read_block(item.path, item.offset, item.size)
        return encode_chunk(Chunk(item.path, item.fmt, list(block_documents(data, item.first_line))))
    if isinstance(item, TextItem):
        return encode_chunk(item.chunk)
    if isinstance(item, RowGroupItem):
        docs, problems = parquet_input.read_row_group(item.path, item.group, item.first_row, item.column)
    else:
        docs, problems = item.docs, item.problems
    enc = encode_chunk(Chunk(item.path, "text", docs))
    # the encoder reports by line; these documents are rows
    found = [replace(p, unit="row") for p in enc.problems]
    enc.problems = sorted(found + problems, key=lambda p: p.line)
    return enc


def _read_block(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, size, offset)
    finally:
        os.close(fd)
    if len(data) != size:
        raise ValueError(f"input {path} changed while it was read (shorter than when its lines were counted)")
    return data
