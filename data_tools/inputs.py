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
Files ending in ``.gz`` are read through gzip.
"""
from __future__ import annotations

import glob
import gzip
import json
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator, List, Optional, Tuple

FORMATS = ("auto", "jsonl", "text")
TEXT_MODES = ("line", "paragraph", "file")
POLICIES = ("skip", "fail")

# Problem categories, as counted in summaries.
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
FIELD_NOT_STRING = "field_not_string"
INVALID_UTF8 = "invalid_utf8"
EMPTY_DOCUMENT = "empty_document"
PROBLEMS = (MALFORMED_JSON, NOT_AN_OBJECT, MISSING_FIELD, FIELD_NOT_STRING, INVALID_UTF8, EMPTY_DOCUMENT)

_JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # paired escapes decode to one code point


@dataclass(frozen=True)
class Problem:
    """One bad input document: where it is and what is wrong with it."""

    path: str
    line: int
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.detail}"


class BadInputError(ValueError):
    """Raised under the ``fail`` policy at the first bad document."""

    def __init__(self, problem: Problem):
        super().__init__(f"{problem} (use --on-error skip to skip and count such documents)")
        self.problem = problem


def expand_inputs(patterns: List[str]) -> List[str]:
    """Expand each glob (or plain path) in order; each must match at least one file."""
    paths: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise ValueError(f"input glob {pattern!r} matches no files")
            paths.extend(matched)
        elif os.path.isfile(pattern):
            paths.append(pattern)
        else:
            raise ValueError(f"input file {pattern!r} does not exist")
    if not paths:
        raise ValueError("no input files given")
    return paths


def resolve_format(path: str, fmt: str) -> str:
    """``auto`` means jsonl for .jsonl/.json/.ndjson (optionally .gz), text otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"input format must be one of {FORMATS}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    return "jsonl" if name.endswith(_JSONL_SUFFIXES) else "text"


def open_binary(path: str) -> BinaryIO:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def _strip_eol(line: bytes) -> bytes:
    if line.endswith(b"\n"):
        line = line[:-1]
        if line.endswith(b"\r"):
            line = line[:-1]
    return line


def iter_raw_documents(path: str, fmt: str, text_mode: str = "line") -> Iterator[Tuple[int, bytes]]:
    """Yield ``(line_number, raw_bytes)`` per document, 1-based line numbers, in file order.

    Blank lines are document separators (paragraph mode) or carry no document (jsonl and
    line mode); they are not yielded, and so never reported as empty documents.
    """
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {TEXT_MODES}, got {text_mode!r}")
    with open_binary(path) as f:
        if fmt == "text" and text_mode == "file":
            data = f.read()
            yield 1, data
            return
        if fmt == "text" and text_mode == "paragraph":
            yield from _iter_paragraphs(f)
            return
        for lineno, line in enumerate(f, start=1):
            raw = _strip_eol(line)
            if raw.strip():
                yield lineno, raw


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
