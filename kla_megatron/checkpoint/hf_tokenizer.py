"""A sentencepiece ``.model`` as a standard Hugging Face tokenizer: ``tokenizer.json`` (the
``tokenizers`` pipeline) + ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast``, a class
of transformers itself, so ``AutoTokenizer`` needs no custom code and no sentencepiece
conversion at load time.

The pipeline reproduces ``SentencePieceProcessor.encode`` (the ids our data pipeline wrote:
no BOS/EOS added) and ``decode``:

- normalizer: the model's precompiled charsmap (if any), extra-whitespace removal (if on),
  spaces → "▁", then the dummy prefix "▁" once at the start of the text (not per chunk, unlike
  a Metaspace pre-tokenizer, which also skips it when the text already starts with a space);
- pre-tokenizer: user-defined pieces (e.g. "\\n") isolated, as sentencepiece emits them whole;
- model: BPE with merges ranked by piece score (or Unigram), byte fallback and fused unknowns;
- special pieces (unk, bos, eos, pad, control symbols) are special added tokens, but
  ``split_special_tokens`` keeps "<s>" in *text* as plain characters, as sentencepiece does.

``export`` checks the result against sentencepiece on probe texts and raises ValueError (one
line naming the text) if any id differs. Known limits: unigram models may break Viterbi ties
differently; with multi-character user-defined pieces (emitted whole through BPE's
``ignore_merges``), a control piece spelled out in text right after one of them ("\n<s>" for a
model that also has "<|sep|>") comes out as the control piece's id.

transformers >= 5 loads ``config.json`` before the tokenizer: a model directory whose config
needs custom code (``auto_map``) makes a bare ``AutoTokenizer.from_pretrained(dir)`` ask about
remote code on a terminal (then fall back to this tokenizer after a timeout); pass
``trust_remote_code`` (False suffices) to skip the question.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPM_FILE = "tokenizer.model"

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
PROBES = [
    "", " ", "  ", "\n", "\nx", "a\nb", "a \n b", "Hello world, this is  a test.", " leading space", "trailing ",
    "\t\ttabs\tand\r\nwindows lines\r\n", "digits 0123456789 and 3.14159", "<s>hi</s> <unk> <pad>",
    "ünïcödé,日本語のテキスト, emoji 🙂🚀, zero\u200bwidth, nbsp\u00a0here", "▁already escaped ▁▁",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n", "MIXED Case And PUNCTUATION!?... (ok) [yes] {no}",
]


def _proto(model_file):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    return proto


def _bpe_merges(proto) -> List[tuple]:
    """Merges of sentencepiece's BPE: every split of a normal piece into two normal pieces,
    ranked by the merged piece's score (then id), as sentencepiece applies them."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, i) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, i, left, right))
    return [(left, right) for _, _, left, right in sorted(ranked)]


def build_tokenizer(model_file):
    """A ``tokenizers.Tokenizer`` that encodes and decodes like the sentencepiece model."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    proto = _proto(model_file)
    spec, trainer = proto.normalizer_spec, proto.trainer_spec
    pieces = list(proto.pieces)
    unk = pieces[trainer.unk_id].piece if 0 <= trainer.unk_id < len(pieces) else None
    user_defined = [p.piece for p in pieces if p.type == _USER_DEFINED]
    if trainer.model_type == 2:  # BPE
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        # A multi-character user-defined piece has no merges that build it: emit a word that is a
        # whole piece as is. (Not otherwise: a word spelling a control piece, "<s>", would match.)
        whole = any(len(p) > 1 for p in user_defined)
        model = models.BPE(vocab=vocab, merges=_bpe_merges(proto), unk_token=unk, fuse_unk=True,
                           byte_fallback=trainer.byte_fallback, dropout=None, ignore_merges=whole)
    elif trainer.model_type == 1:  # unigram
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    else:
        raise ValueError(f"{model_file}: sentencepiece model type {trainer.model_type} (not BPE or unigram) cannot "
                         "be exported as a Hugging Face tokenizer")
    tok = Tokenizer(model)
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    if user_defined:
        pattern = "|".join(re.escape(p) for p in sorted(user_defined, key=len, reverse=True))
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    steps = [decoders.Replace("▁", " ")]
    if trainer.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if spec.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in pieces if p.type in (_UNKNOWN, _CONTROL)])
    tok.encode_special_tokens = True  # "<s>" in text is text, as for sentencepiece
    return tok


def mismatch(tok, sp, texts) -> Optional[str]:
    """The first text on which ``tok`` and the sentencepiece processor ``sp`` disagree (ids, or
    decoding sentencepiece's ids), as a one-line description; None if they agree on all."""
    for text in texts:
        ours, theirs = tok.encode(text, add_special_tokens=False).ids, sp.encode(text)
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return (f"encoding {text[:60]!r}: ids from position {at} are {ours[at:at + 8]}, sentencepiece's "
                    f"{theirs[at:at + 8]}")
        if sp.unk_id() in theirs:  # sentencepiece decodes <unk> as " ⁇ ", transformers as "<unk>"
            continue
        if tok.decode(theirs, skip_special_tokens=False) != sp.decode(theirs):
            return f"decoding the ids of {text[:60]!r}: {tok.decode(theirs)[:60]!r} != {sp.decode(theirs)[:60]!r}"
    return None


def export(model_file, out_dir, extra_texts=()) -> None:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and (for sentencepiece users)
    ``tokenizer.model`` into ``out_dir``; ValueError if the model cannot be reproduced exactly."""
    import shutil

    import sentencepiece as spm

    model_file, out_dir = Path(model_file), Path(out_dir)
    if not model_file.exists():
        raise FileNotFoundError(f"tokenizer model {model_file} does not exist")
    try:
        sp = spm.SentencePieceProcessor(model_file=str(model_file))
    except Exception as exc:
        raise ValueError(f"{model_file} is not a sentencepiece model: {exc}") from exc
    tok = build_tokenizer(model_file)
    problem = mismatch(tok, sp, [*PROBES, *extra_texts])
    if problem:
        raise ValueError(f"{model_file}: the Hugging Face tokenizer built from it differs from sentencepiece, "
                         f"{problem}")

    def piece(i):
        return sp.id_to_piece(i) if 0 <= i < sp.get_piece_size() else None

    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / TOKENIZER_JSON))
    shutil.copyfile(model_file, out_dir / SPM_FILE)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
           "clean_up_tokenization_spaces": False, "split_special_tokens": True,
           "model_max_length": 1_000_000_000, "padding_side": "right",
           "bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
           "pad_token": piece(sp.pad_id()) or piece(sp.eos_id())}
    with open(out_dir / TOKENIZER_CONFIG, "w") as f:
        json.dump({k: v for k, v in cfg.items() if v is not None}, f, indent=1)
