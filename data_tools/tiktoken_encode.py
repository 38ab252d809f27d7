"""Sentencepiece BPE through tiktoken's Rust encoder: the ids of ``SentencePieceProcessor.encode``
with no cache to warm, several times faster than sentencepiece itself.

Glossary: a *piece* is a NORMAL vocabulary entry of the sentencepiece model; a *rank* is
tiktoken's token number, which is also its merge priority (lower merges first); the
*rank table* maps byte strings to ranks, and ``_store``/``_start``/``_len`` map each rank
to its sentencepiece ids (one id, or several byte-fallback ids).

Why it is exact. Sentencepiece's BPE (``bpe_model.cc``) starts from characters and
repeatedly merges the adjacent pair whose concatenation is a piece of the best score,
leftmost on ties. tiktoken (``byte_pair_merge``) starts from bytes and repeatedly merges
the adjacent pair whose concatenation has the lowest rank, leftmost on ties. The rank
table makes the two the same:

1. The first ranks are the UTF-8 prefixes of the vocabulary's multi-byte characters, then
   those characters. They come before every piece, so tiktoken assembles each known
   character before any other merge; a partial character never joins a piece, since a
   piece is valid UTF-8 made of known characters (checked). A character outside the
   vocabulary stays bytes (or a known prefix of bytes), mapped to sentencepiece's
   byte-fallback ids, which is what sentencepiece emits for it.
2. Then the multi-character pieces by falling score. Their scores must all differ
   (checked), so equal ranks only ever mean the same piece, and both sides pick the
   leftmost pair.
3. tiktoken emits a pre-token that is in the table as one token without merging;
   sentencepiece agrees because every piece's text encodes to that piece alone (checked
   for the whole vocabulary when the encoder is built).

Pre-tokens are the cut of ``cached_encode`` (text is cut only where no piece can span, so
the ids of the parts are the ids of the text); "\\n", a user-defined symbol, is a
pre-token of its own. Documents holding another user-defined symbol go to sentencepiece.
Models this does not cover (no byte fallback, tied scores, ...) are reported by
``unsupported`` and encoded by ``cached_encode.CachedEncoder`` instead.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from .cached_encode import (
    _SEGMENT,
    FlatEncoder,
    _WS,
    _fine_pattern,
    flatten,
    gather_runs,
    read_model_proto,
    segment_processor,
    segmentable,
    text_lengths,
    user_symbol_search,
)


def _entries(proto) -> List[Tuple[str, int, float]]:
    """(piece, type, score) of every vocabulary entry, read out of protobuf once (it is slow)."""
    return [(p.piece, p.type, p.score) for p in proto.pieces]


def unsupported(proto, seg_sp, entries: List[Tuple[str, int, float]]) -> Optional[str]:
    """Why the rank table cannot reproduce this model exactly, or None when it can."""
    if not segmentable(proto):
        return "not a lossless whitespace-split BPE model with '\\n' as a user-defined symbol"
    if not proto.trainer_spec.byte_fallback:
        return "no byte fallback (sentencepiece then merges unknown characters into one <unk>)"
    normal = type(proto).SentencePiece.NORMAL
    pieces = [(i, s, score) for i, (s, kind, score) in enumerate(entries) if kind == normal]
    chars = {s for _, s, _ in pieces if len(s) == 1}
    multi = [(i, s, score) for i, s, score in pieces if len(s) > 1]
    if not chars.issuperset("".join(s for _, s, _ in multi)):
        return "a piece holds a character that is not itself a piece"
    if len({score for _, _, score in multi}) != len(multi):
        return "two pieces share a score (sentencepiece would break that tie by position)"
    texts = [s.replace(_WS, " ") for _, s, _ in multi]
    if any(ids != [i] for (i, _, _), ids in zip(multi, seg_sp.encode(texts, out_type=int, num_threads=1))):
        return "a piece's own text does not encode to that piece"
    return None


def rank_table(proto, entries: List[Tuple[str, int, float]]) -> Tuple[Dict[bytes, int], List[List[int]]]:
    """tiktoken's ``mergeable_ranks`` for the model, and the sentencepiece ids of each rank."""
    kinds = type(proto).SentencePiece
    byte_id = {int(s[3:5], 16): i for i, (s, kind, _) in enumerate(entries) if kind == kinds.BYTE}
    # sentencepiece sees a space as "\u2581": the piece "\u2581" is the text " ", and a
    # space without that piece falls back to the bytes of "\u2581"
    char_id = {s.replace(_WS, " "): i for i, (s, kind, _) in enumerate(entries) if kind == kinds.NORMAL and len(s) == 1}
    ranks: Dict[bytes, int] = {}
    ids: List[List[int]] = []

    def add(text: bytes, piece_ids: List[int]) -> None:
        ranks[text] = len(ids)
        ids.append(piece_ids)

    multibyte = [b for b in map(str.encode, char_id) if len(b) > 1]
    for prefix in sorted({b[:k] for b in multibyte for k in range(2, len(b))}):
        add(prefix, [byte_id[x] for x in prefix])
    for b in multibyte:
        add(b, [char_id[b.decode()]])
    multi = [(score, i, s) for i, (s, kind, score) in enumerate(entries) if kind == kinds.NORMAL and len(s) > 1]
    for _, i, s in sorted(multi, key=lambda m: -m[0]):
        add(s.replace(_WS, " ").encode(), [i])
    newline = next(i for i, (s, kind, _) in enumerate(entries) if kind == kinds.USER_DEFINED and s == "\n")
    for x in range(256):
        c = chr(x) if x < 0x80 else None
        fallback = [byte_id[y] for y in _WS.encode()] if c == " " else [byte_id[x]]
        add(bytes([x]), [newline] if c == "\n" else [char_id[c]] if c in char_id else fallback)
    return ranks, ids


class TiktokenEncoder(FlatEncoder):
    """``encode_flat(texts)`` equal to ``sp.encode(texts)`` for the model at ``model_path``.

    Raises ``ValueError`` (naming the reason) for a model the rank table cannot reproduce,
    and ``ImportError`` without tiktoken.
    """

    engine = "tiktoken"

    def __init__(self, model_path: str):
        import sentencepiece as spm
        import tiktoken

        self.sp = spm.SentencePieceProcessor(model_file=model_path)
        proto = read_model_proto(model_path)
        if proto is None:
            raise ValueError("reading the model's settings needs protobuf")
        entries = _entries(proto)
        reason = unsupported(proto, segment_processor(proto), entries)
        if reason:
            raise ValueError(f"{model_path}: {reason}")
        ranks, ids = rank_table(proto, entries)
        self._store, self._len = flatten(ids)
        self._start = np.cumsum(self._len) - self._len
        cut = _fine_pattern([s for s, kind, _ in entries if kind == proto.SentencePiece.NORMAL]) or _SEGMENT
        self._bpe = tiktoken.Encoding(f"sentencepiece:{model_path}", pat_str=cut.pattern,
                                      mergeable_ranks=ranks, special_tokens={})
        self._prefix = " " if proto.normalizer_spec.add_dummy_prefix else ""
        self._user_symbol = user_symbol_search(proto)
        core = getattr(self._bpe, "_core_bpe", None)  # see _ranks for why not the public method
        if core is None:
            raise ImportError(f"tiktoken {tiktoken.__version__} has no Encoding._core_bpe")
        self._encode_ordinary = core.encode_ordinary

    def _ranks(self, text: str) -> List[int]:
        if not text:  # sentencepiece encodes "" as nothing, without the dummy prefix
            return []
        text = self._prefix + (text.replace(_WS, " ") if _WS in text else text)
        try:
            # the core, not Encoding.encode_ordinary: that one silently replaces lone
            # surrogates with U+FFFD (and Encoding.encode_to_numpy is 2x slower)
            return self._encode_ordinary(text)
        except UnicodeEncodeError as e:
            raise ValueError(f"text holds a lone surrogate {text[e.start]!r} at character {e.start}; "
                             f"it has no UTF-8 form to tokenize") from None

    def encode_flat(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        """The ids of all ``texts`` back to back (``int32``), and the number of ids of each."""
        special = [i for i, t in enumerate(texts) if self._user_symbol and self._user_symbol(t)]
        skip = set(special)
        ranks = [[] if i in skip else self._ranks(t) for i, t in enumerate(texts)]
        flat, per_text = flatten(ranks)
        tokens, ends = gather_runs(self._store, self._start, self._len, flat)
        lengths = text_lengths(ends, per_text)
        if not special:
            return tokens, lengths
        pieces = np.split(tokens, np.cumsum(lengths)[:-1])
        for i, ids in zip(special, self.sp.encode([texts[i] for i in special], out_type=int)):
            pieces[i] = np.asarray(ids, np.int32)
        return np.concatenate(pieces), np.fromiter(map(len, pieces), np.int64, len(pieces))


def load_encoder(model_path: str):
    """The fastest exact encoder for the tokenizer, and a line naming it. A sentencepiece model:
    tiktoken's BPE when the rank table reproduces the model, else the segment cache (itself
    falling back to plain sentencepiece), with the reason. Other kinds (``tokenizer.json``,
    tiktoken rank files): their own library (``library_encode.py``)."""
    from kla_megatron.tokenizers import detect_kind, load

    from .cached_encode import CachedEncoder
    from .library_encode import LibraryEncoder

    kind, model_path = detect_kind(model_path)
    if kind != "sentencepiece":
        encoder = LibraryEncoder(load(model_path))
        return encoder, encoder.engine
    try:
        return TiktokenEncoder(model_path), TiktokenEncoder.engine
    except (ImportError, ValueError) as e:
        encoder = CachedEncoder(model_path)
        return encoder, f"{encoder.engine} (tiktoken not used: {e})"
