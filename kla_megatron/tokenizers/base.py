"""What every tokenizer kind provides, and the optional YAML sidecar that completes a file.

A kind wraps one library (sentencepiece, tokenizers, tiktoken) behind the same few members:
``encode``/``encode_batch`` (text -> ids, nothing added), ``decode``, ``vocab_size``, ``eod``
(the id ``kla-preprocess`` appends after every document), ``bos``/``pad`` (ids or None; never
added to data), ``id_to_piece`` and ``fingerprint`` (a content hash, so caches notice a
changed file at the same path). Objects pickle as their path and reload on the other side.
"""
from __future__ import annotations

import difflib
import hashlib
import os
from typing import Iterable, List, Optional, Sequence

SIDECAR_SUFFIX = ".yaml"


class Tokenizer:
    """Base class of the kinds in this package (see the package docstring for each)."""

    kind = ""
    eod: int
    bos: Optional[int] = None
    pad: Optional[int] = None
    vocab_size: int

    def __init__(self, path: str):
        self.path = str(path)

    def __reduce__(self):  # workers and data loaders get the path, not the library object
        return (type(self), (self.path,))

    def encode(self, text: str) -> List[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> Optional[str]:
        """The vocabulary entry of id ``i`` as text (None for an id without one)."""
        raise NotImplementedError

    @property
    def fingerprint(self) -> str:
        raise NotImplementedError

    def describe(self) -> str:
        """One line: kind, file, vocabulary size and the EOD/BOS ids."""
        bos = f", BOS {self.bos} (not added)" if self.bos is not None else ""
        return f"{self.kind} {self.path}: vocab {self.vocab_size}, EOD {self.eod} {self.id_to_piece(self.eod)!r}{bos}"


def file_sha(*paths: str) -> str:
    """Hash of the files' contents (missing files are skipped): what identifies a tokenizer."""
    h = hashlib.sha256()
    for p in paths:
        if p and os.path.isfile(p):
            with open(p, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:16]


def sidecar_path(path: str) -> str:
    """``<file>.yaml`` next to a tokenizer file: settings the file itself does not hold."""
    return str(path) + SIDECAR_SUFFIX


def read_sidecar(path: str, allowed: Sequence[str]) -> dict:
    """The sidecar of ``path`` as a dict ({} if there is none); unknown keys are an error."""
    side = sidecar_path(path)
    if not os.path.isfile(side):
        return {}
    from kla_megatron.yaml_io import parse_yaml

    with open(side, encoding="utf-8") as f:
        data = parse_yaml(f.read(), side)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{side}: expected a mapping of settings ({', '.join(allowed)}), got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{side}: unknown setting {key!r}{hint}; allowed: {', '.join(allowed)}")
    return data


def special_id(path: str, vocab: dict, name: str, role: str) -> int:
    """Id of the special token ``name`` (a token string) chosen as ``role``; ValueError if absent."""
    if not isinstance(name, str) or name not in vocab:
        raise ValueError(f"{path}: {role} token {name!r} is not in the vocabulary")
    return vocab[name]
