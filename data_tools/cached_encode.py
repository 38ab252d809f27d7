"""Segment-cached sentencepiece encoding: the same ids as ``SentencePieceProcessor.encode``,
faster on natural text and code. Preprocess uses it for BPE models that the tiktoken
engine (``tiktoken_encode.py``, faster still) cannot reproduce; the cut of the text
defined here serves both.

Why it is exact. Sentencepiece's BPE (``bpe_model.cc``) starts from single characters
(user-defined symbols matched whole and frozen) and repeatedly merges the adjacent pair
with the best score whose concatenation is a piece of the model (a NORMAL, USER_DEFINED
or UNUSED piece), leftmost first on ties. So if no piece contains the two characters on
either side of a position, no symbol ever spans that position, and the merges left and
right of it never interact: the ids of the text are the ids of the two sides, each
encoded alone. We cut text at such positions, at two levels:

1. ``_SEGMENT``: a newline (a frozen user-defined symbol in our tokenizers); spaces
   followed by non-space characters; trailing spaces. With ``split_by_whitespace`` no
   piece holds a space after a non-space character. Each segment's ids are cached.
2. Cache misses are cut finer by ``_fine_pattern``, built per model: characters fall in
   five classes (ASCII letters, digits, other ASCII, other letters and marks, everything
   else), and two classes are only separated when no piece of the model has characters
   of both next to each other (checked over the whole vocabulary at load time; digits
   stand alone when no piece has two digits in a row). For a model trained with
   sentencepiece's defaults this cuts ``self.assertEqual(x,`` into ``self``, ``.``,
   ``assertEqual``, ``(``, ``x``, ``,``: pieces that are nearly always cached already,
   so sentencepiece only sees text it has never seen in any combination. Misses that
   contain a user-defined symbol (other than ``\\n``) are not cut finer.

Sentencepiece reads a literal ``▁`` in the text as a space (it is its escaped space), so
it is replaced by one before segmenting; the ids do not change.

Segments are encoded without the dummy prefix; the document gets it once, as
sentencepiece does (one space in front). Unigram is not cached: its best path sums float
scores from the start of the text, and exact ties (e.g. in runs of "=") are broken
differently depending on what came before. Models with UNUSED pieces are not cached
either (their resegmentation table is shared across the whole text). Other models where
the argument does not hold (other normalisation, whitespace folding, ``\\n`` not a piece,
symbols containing spaces, no whitespace splitting) use the plain encoder. The test
suite checks the equality on varied text.

Cached ids live in one flat ``int32`` store (a segment is a slot: start and length), so
a document's ids are gathered with numpy instead of being concatenated in Python.
"""
from __future__ import annotations

import gc
import re
import unicodedata
from contextlib import contextmanager
from functools import lru_cache
from itertools import chain, filterfalse, repeat
from operator import itemgetter
from typing import Dict, List, Optional, Tuple

import numpy as np

_SEGMENT = re.compile(r"\n| *[^ \n]+| +")
_CACHE_LIMIT = 1 << 19  # slots (~60 MB per worker); cleared when full, so memory stays bounded
_WS = "\u2581"  # sentencepiece's escaped space; a literal one in the text reads as a space

# The character classes of the finer split. Any partition of the characters keeps the
# encoder exact (the vocabulary check is made with the same partition); this one follows
# where sentencepiece's trainer ends pieces (no piece mixes Unicode scripts, digits stand
# alone with split_digits). Non-ASCII letters and marks are looked up in the BMP only
# (anything above counts as "other", which is still a partition): the regex character
# sets then compile to bitmaps, where non-BMP ranges would be scanned one by one.
_SCAN_END = 0x10000
_ASCII_RANGES = {
    "A": [(0x41, 0x5A), (0x61, 0x7A)],
    "D": [(0x30, 0x39)],
    "P": [(0x00, 0x09), (0x0B, 0x1F), (0x21, 0x2F), (0x3A, 0x40), (0x5B, 0x60), (0x7B, 0x7F)],
}


def _char_class(c: str) -> str:
    o = ord(c)
    if o < 0x80:
        return "A" if c.isalpha() else "D" if c.isdigit() else "P"
    return "W" if o < _SCAN_END and unicodedata.category(c)[0] in "LM" else "Q"


@lru_cache(maxsize=None)
def _class_ranges() -> Dict[str, List[Tuple[int, int]]]:
    """Code point ranges of the classes, "Q" (the rest) left out (the scan takes ~30 ms, once)."""
    cats = map(itemgetter(0), map(unicodedata.category, map(chr, range(0x80, _SCAN_END))))
    flags = bytes(map(b"LM".__contains__, map(str.encode, cats)))
    letters = [(m.start() + 0x80, m.end() + 0x7F) for m in re.finditer(rb"\x01+", flags)]
    return {**_ASCII_RANGES, "W": letters}


def _fine_pattern(pieces: List[str]) -> Optional["re.Pattern"]:
    """The finer split for a model whose mergeable pieces are ``pieces``, or None.

    Classes that meet inside any piece are joined (union-find), so the pattern only
    separates characters that no piece holds side by side. None when nothing would be
    cut finer than ``_SEGMENT``, or when a piece holds a space anywhere but at its start.
    """
    parent = {c: c for c in "ADPWQ"}

    def root(c):
        while parent[c] != c:
            c = parent[c]
        return c

    bodies = [piece.lstrip(_WS) for piece in pieces]
    text = "\n".join(bodies)
    if _WS in text or " " in text or any("\n" in body for body in bodies):
        return None
    # every piece written as its characters' classes, so a class pair is one substring test
    classes = text.translate({ord(c): _char_class(c) for c in set(text) - {"\n"}})
    for x in "ADPWQ":
        for y in "ADPWQ":
            if x != y and x + y in classes:
                parent[root(x)] = root(y)
    digit_runs = "DD" in classes
    groups: Dict[str, List[str]] = {}
    for c in "ADPWQ":
        groups.setdefault(root(c), []).append(c)
    if len(groups) == 1 and digit_runs:
        return None
    ranges = _class_ranges()
    alternatives = []
    for members in groups.values():
        # the group holding "Q" is everything but spaces, newlines and the other groups
        negate = "Q" in members
        span = sorted(chain.from_iterable(ranges[c] for c in "ADPW" if (c in members) != negate))
        charset = "[" + "^ \\n" * negate + "".join(f"\\u{a:04x}-\\u{b:04x}" for a, b in span) + "]"
        alternatives.append(charset if members == ["D"] and not digit_runs else charset + "+")
    if len(alternatives) == 1 and alternatives[0].endswith("+"):
        return None
    return re.compile(r"\n| *(?:" + "|".join(alternatives) + r")| +")


@contextmanager
def _gc_paused():
    """Encoding allocates millions of lists and strings but makes no reference cycles; the
    collector's passes over the growing heap cost ~20 % of a cold-cache run, so it waits."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def read_model_proto(model_path: str):
    """The model's ``ModelProto``, or None when protobuf is missing (then encode plainly)."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
    except ImportError:
        return None
    proto = pb.ModelProto()
    with open(model_path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def segmentable(proto) -> bool:
    """Whether cutting the text where no piece can span keeps the ids (see the module docstring)."""
    ns, ts = proto.normalizer_spec, proto.trainer_spec
    user = [p.piece for p in proto.pieces if p.type == p.USER_DEFINED]
    return (ts.model_type == ts.BPE and ns.name == "identity" and not ns.remove_extra_whitespaces and ns.escape_whitespaces
            and ts.split_by_whitespace and not ts.treat_whitespace_as_suffix
            and "\n" in user and not any((" " in s or "\n" in s or _WS in s) and s != "\n" for s in user)
            and not any(p.type == p.UNUSED for p in proto.pieces))


def segment_processor(proto):
    """A processor for cut-out segments: the model without its dummy prefix (the document gets it once)."""
    import sentencepiece as spm

    seg = type(proto)()
    seg.CopyFrom(proto)
    seg.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=seg.SerializeToString())


def user_symbol_search(proto):
    """``search(text)`` for user-defined symbols other than "\\n" (longest first), or None."""
    user = sorted({p.piece for p in proto.pieces if p.type == p.USER_DEFINED} - {"\n"}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, user))).search if user else None


def gather_runs(store: np.ndarray, start: np.ndarray, length: np.ndarray,
                keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """``store[start[k]:start[k] + length[k]]`` for each k in ``keys``, back to back, and the
    end offset of each run in the result."""
    lengths = length[keys]
    starts = start[keys]
    if len(keys) and lengths.min() == lengths.max() == 1:  # one id each: the common case, 3x cheaper
        return store[starts], np.arange(1, len(keys) + 1)
    ends = np.cumsum(lengths)
    total = int(ends[-1]) if len(ends) else 0
    index = np.repeat(starts - (ends - lengths), lengths) + np.arange(total)
    return store[index], ends


def text_lengths(ends: np.ndarray, parts_per_text: np.ndarray) -> np.ndarray:
    """Ids per text, given the end offset of every part's ids and how many parts each text has."""
    return np.diff(np.concatenate(([0], ends))[np.cumsum(parts_per_text)], prepend=0)


def flatten(runs: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
    """Lists of ids back to back (``int32``), and the length of each list."""
    lengths = np.fromiter(map(len, runs), np.int64, len(runs))
    return np.fromiter(chain.from_iterable(runs), np.int32, int(lengths.sum())), lengths


class FlatEncoder:
    """``encode`` and ``encode_batch`` (lists of ids) on top of a subclass's ``encode_flat``."""

    def encode_flat(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def encode(self, text: str) -> List[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        tokens, lengths = self.encode_flat(texts)
        return [x.tolist() for x in np.split(tokens, np.cumsum(lengths)[:-1])] if texts else []


class CachedEncoder(FlatEncoder):
    """``encode(text) -> list[int]`` equal to ``sp.encode(text)`` for the model at ``model_path``."""

    engine = "segment-cache"

    def __init__(self, model_path: str):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        proto = read_model_proto(model_path)
        self.enabled = proto is not None and segmentable(proto)
        if not self.enabled:
            self.engine = "sentencepiece"
            return
        self.dummy_prefix = proto.normalizer_spec.add_dummy_prefix
        self._seg_sp = segment_processor(proto)
        self._fine = _fine_pattern([p.piece for p in proto.pieces if p.type == p.NORMAL])
        self._guard = user_symbol_search(proto)
        self._reset()

    # ------------------------------------------------------------------ slot store

    def _reset(self) -> None:
        self._slots: Dict[str, int] = {}
        self._start = np.zeros(1 << 16, np.int64)
        self._len = np.zeros(1 << 16, np.int64)
        self._store = np.zeros(1 << 18, np.int32)
        self._n = self._used = 0
        self._encode_new(["\n"])  # slot 0, never a miss: "\n" separates the misses in _learn

    def _add_slots(self, keys: List[str], tokens: np.ndarray, lengths: np.ndarray) -> None:
        n, m = len(keys), len(tokens)
        if self._n + n > len(self._start):
            size = max(2 * len(self._start), self._n + n)
            self._start = np.resize(self._start, size)
            self._len = np.resize(self._len, size)
        if self._used + m > len(self._store):
            self._store = np.resize(self._store, max(2 * len(self._store), self._used + m))
        first = self._n
        self._len[first:first + n] = lengths
        self._start[first:first + n] = self._used + np.cumsum(lengths) - lengths
        self._store[self._used:self._used + m] = tokens
        self._n += n
        self._used += m
        self._slots.update(zip(keys, range(first, first + n)))

    def _gather(self, slots: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Ids of the given slots back to back, and the end offset of each slot in them."""
        return gather_runs(self._store, self._start, self._len, slots)

    def _lookup(self, strings: List[str], learn) -> np.ndarray:
        """Slots of ``strings``; the distinct misses get theirs from ``learn(misses)`` first."""
        slots = np.fromiter(map(self._slots.get, strings, repeat(-1)), np.int64, len(strings))
        missed = np.flatnonzero(slots < 0).tolist()
        if missed:
            missing = list(map(strings.__getitem__, missed))
            keys = list(dict.fromkeys(missing))
            learn(keys)
            slots[missed] = np.fromiter(map(self._slots.__getitem__, missing), np.int64, len(missing))
        return slots

    def _encode_new(self, keys: List[str]) -> None:
        self._add_slots(keys, *flatten(self._seg_sp.encode(keys, out_type=int, num_threads=1)))

    def _learn(self, missing: List[str]) -> None:
        """Give every string in ``missing`` (segments, not cached yet) a slot."""
        if self._fine is None:
            return self._encode_new(missing)
        # All misses in one string, "\n" between them: one findall, and the finer pieces
        # of miss i are the ones between the i-th and (i+1)-th "\n".
        joined = "\n".join(missing)
        if self._guard and self._guard(joined):  # rare: misses holding a user-defined symbol
            self._encode_new(list(filter(self._guard, missing)))
            missing = list(filterfalse(self._guard, missing))
            if not missing:
                return
            joined = "\n".join(missing)
        slots = self._lookup(self._fine.findall(joined), self._encode_new)
        sep = slots == 0  # the slot of "\n" (see _reset); no other piece here holds a newline
        owner = np.cumsum(sep)[~sep]
        slots = slots[~sep]
        tokens, ends = self._gather(slots)
        lengths = np.bincount(owner, weights=self._len[slots], minlength=len(missing)).astype(np.int64)
        self._add_slots(missing, tokens, lengths)

    # ------------------------------------------------------------------ public

    def encode_flat(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        """The ids of all ``texts`` back to back (``int32``), and the number of ids of each."""
        with _gc_paused():
            return self._encode_flat(texts)

    def _encode_flat(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        if not self.enabled:
            return flatten(self.sp.encode(texts, out_type=int))
        if self._n > _CACHE_LIMIT:
            self._reset()
        prefix = " " if self.dummy_prefix else ""
        findall = _SEGMENT.findall
        # sentencepiece encodes "" as no ids at all, without the dummy prefix
        segmented = [findall(prefix + (t.replace(_WS, " ") if _WS in t else t)) if t else [] for t in texts]
        slots = self._lookup(list(chain.from_iterable(segmented)), self._learn)
        tokens, ends = self._gather(slots)
        return tokens, text_lengths(ends, np.fromiter(map(len, segmented), np.int64, len(texts)))
