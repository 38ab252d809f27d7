"""Tokenizers: one loader for every tokenizer file kind, used by ``kla-preprocess``, the
trainer's ``data.tokenizer``, ``kla-convert megatron-to-hf`` and evaluation.

``load(path)`` picks the kind from the path (``detect_kind``) and returns a ``base.Tokenizer``:

- ``sentencepiece``: a ``.model`` (protobuf) from kla-train-tokenizer
  (``sentencepiece_model.py``). EOD: the EOS piece (``</s>``).
- ``hf``: a Hugging Face ``tokenizer.json``, or a folder holding one (``hf_json.py``). EOD: the
  sidecar's ``eod``, else ``eos_token`` of the ``tokenizer_config.json`` beside it, else the
  first of ``<|endoftext|>``, ``<|end_of_text|>``, ``</s>``... in the vocabulary.
- ``tiktoken``: a tiktoken BPE rank file (``*.tiktoken``, Llama 3's ``tokenizer.model``), its
  pattern and special tokens from a preset or the ``<file>.yaml`` sidecar (``tiktoken_bpe.py``).
  EOD: the preset's (``<|endoftext|>``, Llama 3's ``<|end_of_text|>``, nanochat's ``<|bos|>``) or
  the sidecar's ``eod``.

For every kind: ids are the text's alone, no BOS is ever prepended (the model is trained on
``doc EOD doc EOD ...``), and a special token spelled out inside a document (say a web page
quoting ``<|endoftext|>``) is encoded as ordinary text, so only the EOD the pipeline appends
separates documents. ``vocab_size`` is the largest id + 1 (special tokens included); the model's
vocabulary must be at least that. Each kind's module says the rest (sidecar settings, defaults).

This package imports only its tokenizer library (no torch, no megatron-core), so data workers
stay light; ``kla_megatron/training/tokenizer.py`` adapts it to megatron-core and
``hf_export.py`` writes the matching transformers tokenizer.
"""
from __future__ import annotations

import json
import os
from typing import Tuple

from .base import Tokenizer

KINDS = ("sentencepiece", "hf", "tiktoken")
_HEAD = 4096


def _unknown(path: str, why: str) -> ValueError:
    return ValueError(f"{path}: {why}; expected a sentencepiece .model, a Hugging Face tokenizer.json (or a folder "
                      "holding one) or a tiktoken BPE rank file")


def detect_kind(path: str) -> Tuple[str, str]:
    """(kind, file) for a tokenizer path; a one-line ValueError for anything else."""
    from .hf_json import TOKENIZER_JSON
    from .tiktoken_bpe import looks_like_rank_file

    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"tokenizer {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, TOKENIZER_JSON)):
            return "hf", os.path.join(path, TOKENIZER_JSON)
        ranks = sorted(f for f in os.listdir(path) if f.endswith(".tiktoken"))
        if len(ranks) == 1:
            return detect_kind(os.path.join(path, ranks[0]))
        if os.path.isfile(os.path.join(path, "tokenizer.model")):
            return detect_kind(os.path.join(path, "tokenizer.model"))
        raise _unknown(path, "folder without tokenizer.json, tokenizer.model or exactly one *.tiktoken")
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    if not head:
        raise _unknown(path, "empty file")
    if head.lstrip()[:1] == b"{":
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except ValueError as e:
            raise _unknown(path, f"JSON that does not parse ({e})") from None
        if isinstance(data, dict) and "model" in data:
            return "hf", path
        raise _unknown(path, "JSON without a 'model' entry (not a tokenizer.json)")
    if looks_like_rank_file(head):
        return "tiktoken", path
    if head[:1] == b"\n":  # a protobuf whose first field (1, length-delimited) is the piece list
        return "sentencepiece", path
    raise _unknown(path, "not a tokenizer file this program reads")


def load(path: str) -> Tokenizer:
    """The tokenizer at ``path`` (file or folder), of the kind ``detect_kind`` finds."""
    kind, file = detect_kind(path)
    if kind == "sentencepiece":
        from .sentencepiece_model import SentencePieceModel as cls
    elif kind == "hf":
        from .hf_json import HFTokenizerJSON as cls
    else:
        from .tiktoken_bpe import TiktokenBPE as cls
    return cls(file)


__all__ = ["KINDS", "Tokenizer", "detect_kind", "load"]
