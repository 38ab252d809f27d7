"""Workers' encoder for the tokenizer kinds that are not sentencepiece (a Hugging Face
``tokenizer.json``, a tiktoken rank file): the library itself, through
``kla_megatron.tokenizers`` (the loader training and the HF export use), so the dataset's ids
are the ids training and the exported tokenizer produce."""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from .cached_encode import FlatEncoder, flatten

ENGINES = {"hf": "tokenizers (tokenizer.json)", "tiktoken": "tiktoken (rank file)"}


class LibraryEncoder(FlatEncoder):
    """``encode_flat`` over a ``kla_megatron.tokenizers`` tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.engine = ENGINES.get(tok.kind, tok.kind)

    def encode_flat(self, texts: List[str]) -> Tuple[np.ndarray, np.ndarray]:
        return flatten(self.tok.encode_batch(texts))
