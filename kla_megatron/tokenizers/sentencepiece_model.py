"""Kind ``sentencepiece``: a ``.model`` file (as ``kla-train-tokenizer`` writes).

EOD is the model's EOS piece (``</s>`` by default); BOS is its BOS piece if it has one and is
never added. Special pieces spelled out in text are text (sentencepiece's own behaviour).
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

from .base import Tokenizer, file_sha


class SentencePieceModel(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: str):
        super().__init__(path)
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        if self.sp.eos_id() < 0:
            raise ValueError(f"{self.path}: sentencepiece model without an EOS piece, which is the EOD token; "
                             "retrain it with kla-train-tokenizer (its --eos-id defaults to 2)")
        self.vocab_size = self.sp.get_piece_size()
        self.eod = self.sp.eos_id()
        self.bos = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad = self.sp.pad_id() if self.sp.pad_id() >= 0 else None
        self.unk = self.sp.unk_id()

    def encode(self, text: str) -> List[int]:
        return self.sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        return self.sp.encode(list(texts), out_type=int, num_threads=1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> Optional[str]:
        return self.sp.id_to_piece(int(i)) if 0 <= int(i) < self.vocab_size else None

    @property
    def fingerprint(self) -> str:
        return file_sha(self.path)
