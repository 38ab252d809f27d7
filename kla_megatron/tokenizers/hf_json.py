"""Kind ``hf``: a Hugging Face ``tokenizer.json`` (the ``tokenizers`` library), given as the file
or as a folder holding it (a transformers tokenizer folder).

EOD: the sidecar's ``eod`` (``tokenizer.json.yaml``), else ``eos_token`` of a
``tokenizer_config.json`` next to the file, else the first of ``EOD_NAMES`` in the vocabulary.
BOS (never added): the sidecar's ``bos``, the config's ``bos_token``, or the first of
``BOS_NAMES``. The tokenizer's post-processor (a template adding BOS/EOS) is not applied: ids
are the text's alone. Special tokens spelled out in text are text, as for the other kinds;
added tokens that are not special (e.g. chat markers) still match as the file says.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional, Sequence

from .base import Tokenizer, file_sha, read_sidecar, sidecar_path, special_id

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
EOD_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")
BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|bos|>", "<|startoftext|>")
SIDECAR_KEYS = ("eod", "bos")


def _token_name(value) -> Optional[str]:
    """``eos_token`` etc. of a tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_config(path: str) -> dict:
    """The ``tokenizer_config.json`` next to ``path`` ({} if none)."""
    cfg = os.path.join(os.path.dirname(os.path.abspath(path)), TOKENIZER_CONFIG)
    if not os.path.isfile(cfg):
        return {}
    try:
        with open(cfg, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


class HFTokenizerJSON(Tokenizer):
    kind = "hf"

    def __init__(self, path: str):
        super().__init__(path)
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_file(self.path)
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{self.path}: not a Hugging Face tokenizer.json ({str(e).splitlines()[0]})") from None
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not EOD
        self.tok.no_truncation()
        self.tok.no_padding()
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        side, cfg = read_sidecar(self.path, SIDECAR_KEYS), read_config(self.path)
        self.eod = self._pick(vocab, side.get("eod"), _token_name(cfg.get("eos_token")), EOD_NAMES, "EOD")
        bos_name = side.get("bos") or _token_name(cfg.get("bos_token"))
        bos_name = bos_name or next((n for n in BOS_NAMES if n in vocab), None)
        self.bos = special_id(self.path, vocab, bos_name, "BOS") if bos_name else None
        pad_name = _token_name(cfg.get("pad_token"))
        self.pad = vocab.get(pad_name) if pad_name else None

    def _pick(self, vocab, named, configured, known, role) -> int:
        if named is not None:
            return special_id(sidecar_path(self.path), vocab, named, role)
        if configured is not None:
            where = os.path.join(os.path.dirname(os.path.abspath(self.path)), TOKENIZER_CONFIG)
            return special_id(where, vocab, configured, role)
        for name in known:
            if name in vocab:
                return vocab[name]
        raise ValueError(f"{self.path}: no {role} token (no eos_token in a {TOKENIZER_CONFIG} beside it, none of "
                         f"{', '.join(known)} in the vocabulary); name one as `eod: <token>` in "
                         f"{sidecar_path(self.path)}")

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> Optional[str]:
        return self.tok.id_to_token(int(i))

    @property
    def fingerprint(self) -> str:
        return file_sha(self.path, sidecar_path(self.path),
                        os.path.join(os.path.dirname(os.path.abspath(self.path)), TOKENIZER_CONFIG))
