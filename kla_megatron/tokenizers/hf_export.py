"""A ``tokenizers``/``tiktoken`` kind as a standard transformers tokenizer folder:
``tokenizer.json`` + ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast`` (a class of
transformers itself: ``AutoTokenizer`` needs no remote code), giving the ids training saw.
(Sentencepiece models go through ``kla_megatron/checkpoint/hf_tokenizer.py``.)

- ``hf``: the same ``tokenizer.json``, minus a post-processor that adds tokens (a BOS
  template: training ids never had one); the folder's ``tokenizer_config.json`` is kept
  (chat template...) with the class, EOS (= EOD), BOS and PAD set and ``auto_map`` dropped.
- ``tiktoken``: the equivalent byte-level BPE. Vocabulary: each rank's bytes in GPT-2's
  byte-to-character alphabet; merges: every split of a token into two tokens, ordered by the
  token's rank (tiktoken merges the adjacent pair whose concatenation has the lowest rank);
  ``ignore_merges`` (tiktoken emits a pre-token that is itself a token whole); pre-tokenizer:
  the pattern, isolated, then byte-level without its own regex. Special tokens keep their ids.
  The rank file and its sidecar are copied beside it.

Both set ``split_special_tokens`` (special tokens in text are text, as in our data). ``export``
checks the written tokenizer against ours on ``PROBES`` and raises ValueError naming the
first text whose ids differ.
"""
from __future__ import annotations

import json
import re
import shutil
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .base import Tokenizer, sidecar_path
from .hf_json import TOKENIZER_CONFIG, TOKENIZER_JSON

PROBES = [
    "", " ", "  ", "\n", "\n\n\n", "a\nb", "a \n b", "Hello world, this is  a test.", " leading space", "trailing  ",
    "\t\ttabs\tand\r\nwindows lines\r\n", "digits 0123456789 and 3.14159, 1,000,000",
    "1234 12345 1234567", "<s>hi</s> <unk> <pad>",
    "ünïcödé, 日本語のテキスト, emoji 🙂🚀👩‍👩‍👧, zero\u200bwidth, nbsp\u00a0here, e\u0301", "▁already escaped ▁▁",
    "def f(x):\n    return {'a': [1, 2]}  # comment\n\tif x:\n\t\tpass\n", "MIXED Case AND PUNCT!?... (ok) [y] {n}",
    "<|endoftext|> <|end_of_text|><|bos|> <|begin_of_text|>", "don't we'll I'M they've 'quoted'", "a" * 300,
]
_NO_ADDED = ("TemplateProcessing", "BertProcessing", "RobertaProcessing")
# A possessive bounded repeat, "X{1,3}+" (GPT-4's digit groups), which Oniguruma (the regex
# engine of tokenizers) reads as "(X{1,3})+": unbounded.
_POSSESSIVE_BOUNDED = re.compile(r"(?<!\\)(\{\d+(?:,\d*)?\})\+")


def onig_pattern(pattern: str) -> str:
    """tiktoken's pattern for Oniguruma: possessive bounded repeats made greedy (the same matches
    here, as nothing after them in a pre-tokenizer alternative backtracks; ``export`` checks)."""
    return _POSSESSIVE_BOUNDED.sub(r"\1", pattern)


@lru_cache(maxsize=1)
def bytes_to_unicode() -> Dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _spell(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def tiktoken_to_hf(tok):
    """The ``tokenizers.Tokenizer`` of a ``tiktoken_bpe.TiktokenBPE``."""
    from tokenizers import AddedToken, Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    ranks = tok.ranks
    vocab = {_spell(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], _spell(left), _spell(right)))
    merges.sort()
    # Special tokens sit in the model's vocabulary at their ids (ids may leave gaps, which added
    # tokens alone cannot), then are declared special; no merge builds them from text.
    vocab.update(tok.specials)
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], ignore_merges=True,
                                fuse_unk=False, byte_fallback=False, dropout=None, unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(tok.pattern)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False)
                           for s, _ in sorted(tok.specials.items(), key=lambda kv: kv[1])])
    return hf


def hf_json_for_export(tok):
    """The ``tokenizer.json`` of an ``hf_json.HFTokenizerJSON`` without token-adding post-processing."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads(Path(tok.path).read_text(encoding="utf-8"))
    post = data.get("post_processor")
    if isinstance(post, dict):
        if post.get("type") in _NO_ADDED:
            data["post_processor"] = None
        elif post.get("type") == "Sequence":
            kept = [p for p in post.get("processors", []) if p.get("type") not in _NO_ADDED]
            data["post_processor"] = {**post, "processors": kept} if kept else None
    data["truncation"] = data["padding"] = None
    hf = HFTokenizer.from_str(json.dumps(data))
    if hf.num_special_tokens_to_add(False):
        raise ValueError(f"{tok.path}: its post-processor adds tokens and could not be removed for the export")
    return hf


def mismatch(hf, tok: Tokenizer, texts: Sequence[str]) -> Optional[str]:
    """The first text on which the HF tokenizer ``hf`` (special tokens in text split) and ``tok``
    disagree, encoding or decoding, as one line; None if they agree on all."""
    hf.encode_special_tokens = True
    for text in texts:
        ours, theirs = tok.encode(text), hf.encode(text, add_special_tokens=False).ids
        if ours != theirs:
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            return (f"encoding {text[:60]!r}: ids from position {at} are {theirs[at:at + 8]}, the {tok.kind} "
                    f"tokenizer's {ours[at:at + 8]}")
        if hf.decode(ours, skip_special_tokens=False) != tok.decode(ours):
            return f"decoding the ids of {text[:60]!r}"
    return None


def _config(tok: Tokenizer, base: dict) -> dict:
    def piece(i):
        return tok.id_to_piece(i) if i is not None else None

    cfg = {k: v for k, v in base.items() if k not in ("auto_map", "added_tokens_decoder", "tokenizer_file")}
    cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
                "clean_up_tokenization_spaces": False, "split_special_tokens": True,
                "model_max_length": 1_000_000_000, "padding_side": cfg.get("padding_side", "right"),
                "eos_token": piece(tok.eod), "pad_token": piece(tok.pad) or piece(tok.eod)})
    cfg["bos_token"] = piece(tok.bos)
    return {k: v for k, v in cfg.items() if v is not None}


def export(tok: Tokenizer, out_dir, extra_texts: Sequence[str] = ()) -> List[str]:
    """Write the HF tokenizer of ``tok`` (kind ``hf`` or ``tiktoken``) into ``out_dir``; returns the
    file names written. ValueError if it does not reproduce ``tok`` exactly."""
    from .hf_json import read_config

    if tok.kind == "tiktoken":
        hf, base = tiktoken_to_hf(tok), {}
    elif tok.kind == "hf":
        hf, base = hf_json_for_export(tok), read_config(tok.path)
    else:
        raise ValueError(f"{tok.path}: {tok.kind} tokenizers are exported by kla_megatron.checkpoint.hf_tokenizer")
    problem = mismatch(hf, tok, [*PROBES, *extra_texts])
    if problem:
        raise ValueError(f"{tok.path}: the Hugging Face tokenizer built from it differs from the {tok.kind} "
                         f"tokenizer, {problem}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save(str(out / TOKENIZER_JSON))
    (out / TOKENIZER_CONFIG).write_text(json.dumps(_config(tok, base), indent=1, ensure_ascii=False) + "\n")
    written = [TOKENIZER_JSON, TOKENIZER_CONFIG]
    if tok.kind == "tiktoken":  # the original, for tiktoken users (our loader reads it too)
        for src in (Path(tok.path), Path(sidecar_path(tok.path))):
            if src.is_file():
                shutil.copyfile(src, out / src.name)
                written.append(src.name)
    return written
