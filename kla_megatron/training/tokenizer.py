"""The training-side tokenizer: a thin megatron-core adapter over a sentencepiece ``.model``.

The training config names the ``.model`` written by ``kla-train-tokenizer``;
``load_tokenizer(path)`` returns an object that megatron-core's datasets accept
(``GPTDatasetConfig(tokenizer=...)``): it implements ``MegatronTokenizerBase`` (the type
megatron-core 0.16+ datasets declare) and the legacy attribute set they read
(``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``...).

EOD is the model's EOS piece (``</s>``), the same id ``data_tools.preprocess`` appends
after every document, so datasets and training agree by construction.
"""
from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Dict, Iterable, List

from megatron.core.tokenizers import MegatronTokenizerBase


class SentencePieceTokenizer(MegatronTokenizerBase):
    """megatron-core tokenizer over a sentencepiece model file.

    Args:
        model_path: path of a sentencepiece ``.model``; it must define an EOS piece.
    """

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise ValueError(f"tokenizer model {model_path!r} does not exist; train one with kla-train-tokenizer "
                             "or set the training config's tokenizer path")
        # MegatronTokenizerBase copies `config` items onto self: only plain fields here.
        super().__init__(model_path, {"library": "sentencepiece", "model_type": "gpt"})
        with open(model_path, "rb") as f:
            proto = f.read()
        self._load(proto)
        if self._sp.eos_id() < 0:
            raise ValueError(f"tokenizer model {model_path!r} has no EOS piece, which training uses as EOD; "
                             "retrain it with kla-train-tokenizer (its --eos-id defaults to 2)")
        # Content hash, so megatron's dataset cache notices a retrained model at the same path.
        self._sha = hashlib.sha256(proto).hexdigest()[:16]

    def _load(self, proto: bytes) -> None:
        import sentencepiece as spm

        self._proto = proto
        self._sp = spm.SentencePieceProcessor(model_proto=proto)

    # Data loader workers may pickle the tokenizer; the processor itself is not picklable.
    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_sp"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._load(self._proto)

    def tokenize(self, text: str) -> List[int]:
        """Text -> token ids (no BOS/EOS added)."""
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Iterable[int]) -> str:
        """Token ids (list, numpy array or tensor) -> text; exact inverse of ``tokenize``."""
        return self._sp.decode([int(i) for i in ids])

    def apply_chat_template(self, *args, **kwargs):
        raise NotImplementedError("SentencePieceTokenizer has no chat template (pretraining tokenizer)")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> Dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def inv_vocab(self) -> Dict[int, str]:
        return {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Keys megatron-core hashes into its dataset cache names."""
        return OrderedDict(class_=f"{type(self).__module__}.{type(self).__qualname__}",
                           tokenizer_path=self.path, model_sha256=self._sha)

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._optional(self._sp.bos_id(), "bos")

    @property
    def pad(self) -> int:
        return self._optional(self._sp.pad_id(), "pad")

    @property
    def unk(self) -> int:
        return self._sp.unk_id()

    def _optional(self, i: int, name: str) -> int:
        # megatron-core treats a raising `pad` as "no pad token" and picks its own.
        if i < 0:
            raise ValueError(f"tokenizer {self.path!r} has no {name} piece (trained with --{name}-id -1)")
        return i

    @property
    def cls(self) -> int:
        raise NotImplementedError("SentencePieceTokenizer has no CLS token (GPT-style pretraining only)")

    @property
    def sep(self) -> int:
        raise NotImplementedError("SentencePieceTokenizer has no SEP token (GPT-style pretraining only)")

    @property
    def mask(self) -> int:
        raise NotImplementedError("SentencePieceTokenizer has no MASK token (GPT-style pretraining only)")


def load_tokenizer(model_path: str) -> SentencePieceTokenizer:
    """The tokenizer named by a training config (path of a sentencepiece ``.model``)."""
    return SentencePieceTokenizer(model_path)


build_tokenizer = load_tokenizer
