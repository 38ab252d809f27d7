"""The training-side tokenizer: a thin megatron-core adapter over any tokenizer kind of
``kla_megatron/tokenizers`` (a sentencepiece ``.model``, a Hugging Face ``tokenizer.json`` or
folder, a tiktoken rank file).

The training config names it as ``data.tokenizer``; ``load_tokenizer(path)`` returns an object
that megatron-core's datasets accept (``GPTDatasetConfig(tokenizer=...)``): it implements
``MegatronTokenizerBase`` (the type megatron-core 0.16+ datasets declare) and the legacy
attribute set they read (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``...).

EOD is the id ``kla-preprocess`` appends after every document (per kind: the sentencepiece
EOS piece, the tokenizer.json's EOS token, the tiktoken preset's or sidecar's EOD; see
``kla_megatron/tokenizers/__init__.py``): both load the file through ``kla_megatron.tokenizers``,
so datasets and training agree by construction. No BOS is added.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Iterable, List

from megatron.core.tokenizers import MegatronTokenizerBase

from kla_megatron import tokenizers


class KLATokenizer(MegatronTokenizerBase):
    """megatron-core tokenizer over a ``kla_megatron.tokenizers`` tokenizer.

    Args:
        path: a tokenizer file or folder (see ``kla_megatron.tokenizers.detect_kind``).
    """

    def __init__(self, path: str):
        tok = tokenizers.load(path)  # one-line ValueError for a missing or unknown file
        # MegatronTokenizerBase copies `config` items onto self: only plain fields here.
        super().__init__(str(path), {"library": tok.kind, "model_type": "gpt"})
        self._tok = tok
        self._sha = tok.fingerprint  # so megatron's dataset cache notices a changed file at the same path

    @property
    def kind(self) -> str:
        return self._tok.kind

    @property
    def core(self) -> tokenizers.Tokenizer:
        """The library-level tokenizer (``encode_batch``, ``id_to_piece``, ...)."""
        return self._tok

    def tokenize(self, text: str) -> List[int]:
        """Text -> token ids (no BOS/EOS added)."""
        return self._tok.encode(text)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Token ids (list, numpy array or tensor) -> text."""
        return self._tok.decode(int(i) for i in ids)

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("KLATokenizer has no chat template (pretraining tokenizer)")

    @property
    def vocab_size(self) -> int:
        return self._tok.vocab_size

    @property
    def vocab(self) -> Dict[str, int]:
        return {p: i for i, p in self.inv_vocab.items()}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        pieces = ((i, self._tok.id_to_piece(i)) for i in range(self.vocab_size))
        return {i: p for i, p in pieces if p is not None}

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Keys megatron-core hashes into its dataset cache names."""
        return OrderedDict(class_=f"{type(self).__module__}.{type(self).__qualname__}",
                           tokenizer_path=self.path, model_sha256=self._sha)

    @property
    def eod(self) -> int:
        return self._tok.eod

    @property
    def eos(self) -> int:
        return self._tok.eod

    @property
    def bos(self) -> int:
        return self._optional(self._tok.bos, "bos")

    @property
    def pad(self) -> int:
        return self._optional(self._tok.pad, "pad")

    @property
    def unk(self) -> int:
        return self._optional(getattr(self._tok, "unk", None), "unk")

    def _optional(self, i, name: str) -> int:
        # megatron-core treats a raising `pad` as "no pad token" and picks its own.
        if i is None:
            what = f"{name} piece (trained with --{name}-id -1)" if self.kind == "sentencepiece" else f"{name} token"
            raise ValueError(f"tokenizer {self.path!r} has no {what}")
        return i

    @property
    def cls(self) -> int:
        raise NotImplementedError("KLATokenizer has no CLS token (GPT-style pretraining only)")

    @property
    def sep(self) -> int:
        raise NotImplementedError("KLATokenizer has no SEP token (GPT-style pretraining only)")

    @property
    def mask(self) -> int:
        raise NotImplementedError("KLATokenizer has no MASK token (GPT-style pretraining only)")


def load_tokenizer(path: str) -> KLATokenizer:
    """The tokenizer named by a training config's ``data.tokenizer`` (any kind)."""
    return KLATokenizer(path)
