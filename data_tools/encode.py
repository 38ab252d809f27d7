"""Worker side of ``preprocess``: decode and tokenize one chunk of raw documents.

Runs in spawned worker processes (or in-process with one worker), so it imports only
numpy and the tokenizer libraries (no torch). Encoding goes through
``tiktoken_encode.load_encoder``: for a sentencepiece model the same ids as sentencepiece, from
tiktoken's Rust BPE (or the segment cache of ``cached_encode.py`` for models it cannot
reproduce); for a ``tokenizer.json`` or a tiktoken rank file, that library's ids through
``kla_megatron.tokenizers`` (``library_encode.py``). A chunk's result depends only on the
chunk, which is what makes multi-worker output byte-identical to single-worker output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

from .inputs import Problem, decode_document
from .sentences import split_sentences
from .tiktoken_encode import load_encoder


@dataclass
class Chunk:
    """Consecutive raw documents of one file, in file order."""

    path: str
    fmt: str
    docs: List[Tuple[int, bytes]]  # (line number, raw bytes)

    @property
    def nbytes(self) -> int:
        return sum(len(raw) for _, raw in self.docs)


@dataclass
class EncodedChunk:
    """Token ids of a chunk's good documents, laid out as the indexed dataset wants them.

    ``tokens`` is all sequences back to back; ``sequence_lengths[i]`` is the length of
    sequence i (a sentence, or a whole document); ``sequences_per_document[j]`` is how
    many sequences document j has. The EOD id ends each document's last sequence.
    """

    tokens: np.ndarray
    sequence_lengths: np.ndarray
    sequences_per_document: np.ndarray
    nbytes: int
    problems: List[Problem] = field(default_factory=list)
    encoder: str = ""  # which engine produced the ids, from load_encoder


_STATE: dict = {}


def init_worker(model_path: str, json_key: str, split: bool, dtype: str = "int32") -> None:
    """Load the tokenizer once per worker process; ids are returned as ``dtype``, the output's
    (a ``uint16`` result crosses the pipe to the writer in half the bytes of ``int32``)."""
    encoder, engine = load_encoder(model_path)
    # the library tokenizer knows its EOD; sentencepiece's is the EOS piece
    eod = encoder.tok.eod if hasattr(encoder, "tok") else encoder.sp.eos_id()
    if eod < 0:
        raise ValueError(f"tokenizer {model_path} has no EOS piece to use as EOD; retrain it with an --eos-id")
    _STATE.update(encoder=encoder, eod=eod, json_key=json_key, split=split, engine=engine, dtype=np.dtype(dtype))


def encode_chunk(chunk: Chunk) -> EncodedChunk:
    encode_flat, eod, split = _STATE["encoder"].encode_flat, _STATE["eod"], _STATE["split"]
    texts: List[str] = []
    per_doc: List[int] = []
    problems: List[Problem] = []
    for lineno, raw in chunk.docs:
        text, kind, detail = decode_document(raw, chunk.fmt, _STATE["json_key"])
        if text is None:
            problems.append(Problem(chunk.path, lineno, kind, detail))
            continue
        pieces: Optional[List[str]] = split_sentences(text) if split else None
        texts.extend(pieces if pieces is not None else (text,))
        per_doc.append(len(pieces) if pieces is not None else 1)

    tokens, lengths = encode_flat(texts)
    # EOD closes the document: insert it after each document's last sequence.
    last = np.cumsum(np.asarray(per_doc, dtype=np.int64)) - 1
    tokens = np.insert(tokens, np.cumsum(lengths)[last], np.int32(eod))
    lengths[last] += 1
    return EncodedChunk(
        tokens=tokens.astype(_STATE["dtype"], copy=False),
        sequence_lengths=lengths,
        sequences_per_document=np.asarray(per_doc, dtype=np.int64),
        nbytes=chunk.nbytes,
        problems=problems,
        encoder=_STATE["engine"],
    )
