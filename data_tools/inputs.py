"""Reading raw corpora: expand globs, stream documents as raw bytes with their line
numbers, and decode one document into text or a named problem.

Reading and decoding are split on purpose: the reader (one process) only finds document
boundaries in bytes, so it stays cheap and keeps the order; decoding (UTF-8, JSON, field
lookup) runs in the workers next to tokenization.

Formats:
- ``jsonl``: one JSON object per line, text in a chosen field (``--json-key``).
- ``text``: plain UTF-8 text; ``text_mode`` picks what a document is: ``line`` (each
  line), ``paragraph`` (blocks separated by blank lines) or ``file`` (the whole file;
  that file must fit in memory).
- ``parquet``: one column of a parquet file (``parquet_input.py``).
Compressed files (gzip, zstandard, xz) are recognised by their first bytes and read
decompressed; a binary file of another kind is refused (``filetypes.py``).

Inputs are files, globs (sorted) and directories (every file below, sorted, leaving out
names starting with ``.`` or ``_``, hidden files and markers such as ``_SUCCESS``, and with a
notice the files that are not data: README, LICENSE, ``.md``, ``.yaml``, ``.py``, ...).
"""
from __future__ import annotations

import glob
import json
import os
import re
import sys
from dataclasses import dataclass
from contextlib import contextmanager
from typing import BinaryIO, Iterator, List, Optional, Tuple

from .filetypes import BinaryInputError, decompression_errors, open_stream, sniff

FORMATS = ("auto", "jsonl", "text", "parquet")
TEXT_MODES = ("line", "paragraph", "file")
POLICIES = ("skip", "fail")

# Problem categories, as counted in summaries.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
FIELD_NOT_STRING = "field_not_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd", ".xz")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # paired escapes decode to one code point


@dataclass(frozen=True)
class Problem:
    """One bad input document: where it is and what is wrong with it.

    ``line`` is a 1-based line number, or with ``unit="row"`` a 0-based row index
    (parquet, Hugging Face datasets), printed as ``file:row N``.
    """

    path: str
    line: int
    kind: str
    detail: str
    unit: str = "line"

    def __str__(self) -> str:
        where = f"{self.line}" if self.unit == "line" else f"{self.unit} {self.line}"
        return f"{self.path}:{where}: {self.kind}: {self.detail}"

    def to_dict(self) -> dict:
        return {"path": self.path, self.unit: self.line, "kind": self.kind, "detail": self.detail}


class BadInputError(ValueError):
    """Raised under the ``fail`` policy at the first bad document."""

    def __init__(self, problem: Problem):
        super().__init__(f"{problem} (use --on-error skip to skip and count such documents)")
        self.problem = problem


# Files that sit next to data shards but are not data (a dataset card, its config, checksums).
_NOT_DATA = re.compile(r"(?i)^(readme|license|licence|changelog|citation)\b|\.(md|rst|ya?ml|py|sh|crc|lock|toml|cfg|ini)$")


def _listed(name: str) -> bool:
    return not name.startswith((".", "_"))


def _directory_files(directory: str) -> List[str]:
    found, left_out = [], []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if _listed(d)]
        for f in filter(_listed, files):
            (left_out if _NOT_DATA.search(f) else found).append(os.path.join(root, f))
    if left_out:
        names = ", ".join(os.path.relpath(p, directory) for p in sorted(left_out)[:5])
        print(f"input directory {directory}: left out {len(left_out)} file(s) that are not data: {names}"
              + (", ..." if len(left_out) > 5 else ""), file=sys.stderr)
    return sorted(found)


def expand_inputs(patterns: List[str]) -> List[str]:
    """Expand each glob, directory or plain path in order; each must give at least one file."""
    paths: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise ValueError(f"input glob {pattern!r} matches no files")
            paths.extend(matched)
        elif os.path.isdir(pattern):
            found = _directory_files(pattern)
            if not found:
                raise ValueError(f"input directory {pattern!r} has no files (names starting with . or _ are left out)")
            paths.extend(found)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise ValueError(f"input file {pattern!r} does not exist")
    if not paths:
        raise ValueError("no input files given")
    return paths


def resolve_format(path: str, fmt: str) -> str:
    """``auto`` means parquet for .parquet/.pq, jsonl for .jsonl/.json/.ndjson (each
    optionally .gz/.zst/.xz), text otherwise; ``check_format`` then looks at the content."""
    if fmt not in FORMATS:
        raise ValueError(f"input format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    name = path
    for suffix in _COMPRESSED_SUFFIXES:
        name = name.removesuffix(suffix)
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


def check_format(path: str, fmt: str) -> str:
    """The format to read ``path`` in, from the requested format and the file's first bytes.

    Raises ``BinaryInputError`` (one line naming the file) for binary content, for parquet
    given as text or JSONL, and for a ``.parquet`` file that is not parquet.
    """
    codec, kind = sniff(path)
    resolved = resolve_format(path, fmt)
    if kind == "parquet":
        if codec:
            raise BinaryInputError(f"input {path} is {codec}-compressed parquet; decompress it first "
                                   "(parquet compresses its own pages)")
        if fmt in ("auto", "parquet"):
            return "parquet"
        raise BinaryInputError(f"input {path} is a parquet file, not {fmt}; drop --input-format {fmt} "
                               "(or pass --input-format parquet) to read its --text-column")
    if kind != "text":
        raise BinaryInputError(f"input {path} is {kind}, not text, JSONL or parquet; remove it from --input")
    if resolved == "parquet":
        raise BinaryInputError(f"input {path} is not a parquet file (no PAR1 header)"
                               + ("; pass --input-format text or jsonl to read it as text" if fmt == "auto" else ""))
    return resolved


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def iter_raw_documents(path: str, fmt: str, text_mode: str = "line",
                       column: str = "text") -> Iterator[Tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` per document, 1-based line numbers, in file order.

    Blank lines are document separators (paragraph mode) or carry no document (jsonl and
    line mode); they are not yielded, and so never reported as empty documents. Binary
    files are refused (``check_format``). Parquet yields ``(row, raw)`` of the string rows
    of ``column`` (``parquet_input.iter_parquet_rows``).
    """
    fmt = check_format(path, fmt)
    if fmt == "parquet":
        from .parquet_input import iter_parquet_rows

        yield from iter_parquet_rows(path, column)
        return
    with text_documents(path, fmt, text_mode) as (docs, _):
        yield from docs


@contextmanager
def text_documents(path: str, fmt: str, text_mode: str = "line"):
    """Open a text or JSONL file: gives ``(documents, disk_position)`` where documents
    iterates ``(line_number, raw_bytes)`` as ``iter_raw_documents`` and ``disk_position()``
    is how many bytes of the (possibly compressed) file have been read."""
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {TEXT_MODES}, got {text_mode!r}")
    stream, position = open_stream(path)
    with stream:
        yield _checked(path, _documents(stream, fmt, text_mode)), position


@contextmanager
def text_blocks(path: str, block_bytes: int):
    """Open a text or JSONL file for line-mode reading in blocks: gives ``(blocks,
    disk_position)`` where blocks iterates ``line_blocks`` of the decompressed file and
    ``disk_position`` is as in ``text_documents``. The reader only cuts blocks; whoever
    encodes a block splits it into documents (``block_documents``)."""
    stream, position = open_stream(path)
    with stream:
        yield _checked(path, line_blocks(stream, block_bytes)), position


def _checked(path: str, documents: Iterator) -> Iterator:
    """A damaged or truncated compressed file is a one-line error naming it, not a traceback."""
    try:
        yield from documents
    except decompression_errors() as e:
        raise ValueError(f"input {path} is truncated or damaged: it could not be decompressed to its end "
                         f"({type(e).__name__}: {e})") from None


def _documents(f: BinaryIO, fmt: str, text_mode: str) -> Iterator[Tuple[int, bytes]]:
    if fmt == "text" and text_mode == "file":
        yield 1, f.read()
        return
    if fmt == "text" and text_mode == "paragraph":
        yield from _iter_paragraphs(f)
        return
    for first_line, data in line_blocks(f, 1 << 20):
        yield from block_documents(data, first_line)


def line_blocks(f: BinaryIO, block_bytes: int) -> Iterator[Tuple[int, bytes]]:
    """``(first_line, data)``: the stream in blocks of about ``block_bytes``, each ending at
    the end of a line (or of the file), with the 1-based number of its first line."""
    first_line = 1
    while True:
        data = f.read(block_bytes)
        if not data:
            return
        if not data.endswith(b"\n"):
            data += f.readline()
        yield first_line, data
        first_line += data.count(b"\n")


def block_documents(data: bytes, first_line: int) -> Iterator[Tuple[int, bytes]]:
    """``(line_number, raw)`` of each line of a ``line_blocks`` block that is not blank, without
    its line end: ``"\n"`` and a ``"\r"`` before it (a last line with no ``"\n"`` is kept whole,
    as iterating over the file gives it). One split of the block, not a call per line."""
    lines = data.split(b"\n")
    last = len(lines) - 1
    for i, line in enumerate(lines):
        if i < last and line.endswith(b"\r"):
            line = line[:-1]
        if line.strip():
            yield first_line + i, line


def _iter_paragraphs(f: BinaryIO) -> Iterator[Tuple[int, bytes]]:
    start, block = 0, []
    for lineno, line in enumerate(f, start=1):
        raw = _strip_eol(line)
        if raw.strip():
            if not block:
                start = lineno
            block.append(raw)
        elif block:
            yield start, b"\n".join(block)
            block = []
    if block:
        yield start, b"\n".join(block)


def decode_document(raw: bytes, fmt: str, json_key: str) -> Tuple[Optional[str], Optional[str], str]:
    """Decode one raw document: returns ``(text, None, "")`` or ``(None, kind, detail)``.

    Nothing is repaired: invalid UTF-8 is rejected rather than replaced, so a document
    is either kept exactly or reported.
    """
    try:
        s = raw_text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, INVALID_UTF8, f"invalid UTF-8 byte(s) {raw[e.start:e.end]!r} at byte offset {e.start}"
    if fmt == "jsonl":
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            return None, MALFORMED_JSON, f"{e.msg} at column {e.colno}"
        if not isinstance(obj, dict):
            return None, NOT_AN_OBJECT, f"expected a JSON object, got {type(obj).__name__}"
        if json_key not in obj:
            keys = ", ".join(sorted(map(str, obj))[:8]) or "none"
            return None, MISSING_FIELD, f"no field {json_key!r} (fields: {keys})"
        s = obj[json_key]
        if not isinstance(s, str):
            return None, FIELD_NOT_STRING, f"field {json_key!r} is {type(s).__name__}, expected a string"
        # a "\\udXXX" escape can decode to half a surrogate pair: text with no UTF-8 form
        if "\\ud" in raw_text or "\\uD" in raw_text:
            surrogate = _LONE_SURROGATE.search(s)
            if surrogate:
                return None, INVALID_UTF8, (f"field {json_key!r} holds the lone surrogate "
                                            f"\\u{ord(surrogate.group()):04x} (a JSON escape with no UTF-8 form)")
    if not s.strip():
        return None, EMPTY_DOCUMENT, "document is empty or whitespace only"
    return s, None, ""
