"""``kla-train-tokenizer --model-type byte-bpe``: a byte-level BPE as GPT-2, GPT-4, Llama 3 and
nanochat use, trained with the ``tokenizers`` library and written as a tiktoken rank file.

Training text is every sampled document whole (streamed, not held in memory: the trainer keeps
only pre-token counts), so newlines, blank lines and indentation are learned. Pre-tokens are cut
by ``--pattern`` (a preset of ``kla_megatron/tokenizers/tiktoken_bpe.py``, default nanochat's,
or a regex). Writes

- ``<prefix>.tiktoken``: ranks = the trainer's ids (the 256 bytes, then the merges in the order
  learned), so each token ranks after its parts and tiktoken's lowest-rank-first merging
  replays training;
- ``<prefix>.tiktoken.yaml``: the pattern and ``--special-tokens`` (ids after the ranks; the
  first is the EOD that ``kla-preprocess`` appends);
- ``<prefix>.json``: what was trained on what, as for sentencepiece models.

The vocabulary size counts the special tokens.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import List

SUFFIXES = (".tiktoken", ".tiktoken.yaml", ".json")


def _trainer_tokenizer(pattern: str):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    from kla_megatron.tokenizers.hf_export import onig_pattern

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(onig_pattern(pattern)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    return tok


def train_byte_bpe(cfg, paths: List[str]) -> dict:
    """Train on the sampled documents of ``paths`` (a ``train_tokenizer.TokenizerConfig``), write
    the three files and return the JSON description."""
    import tokenizers
    import yaml
    from tokenizers import pre_tokenizers, trainers

    from kla_megatron.tokenizers import load
    from kla_megatron.tokenizers.hf_export import bytes_to_unicode
    from kla_megatron.tokenizers.tiktoken_bpe import PRESETS

    from .train_tokenizer import ROUND_TRIP_CHECK_DOCS, SampleStats, sampled_texts

    start = time.perf_counter()
    pattern = PRESETS[cfg.pattern][0] if cfg.pattern in PRESETS else cfg.pattern
    n_ranks = cfg.vocab_size - len(cfg.special_tokens)
    if n_ranks <= 256:
        raise ValueError(f"--vocab-size {cfg.vocab_size} leaves {n_ranks} byte-level tokens after "
                         f"{len(cfg.special_tokens)} special tokens; it must be above 256 + {len(cfg.special_tokens)}")
    try:
        tok = _trainer_tokenizer(pattern)
    except Exception as e:  # tokenizers raises a bare Exception for a bad regex
        raise ValueError(f"--pattern does not compile: {str(e).splitlines()[0]}") from None
    stats, check_docs = SampleStats(), []

    def texts():
        for text in sampled_texts(cfg, paths, stats):
            if len(check_docs) < ROUND_TRIP_CHECK_DOCS:
                check_docs.append(text)
            yield text

    trainer = trainers.BpeTrainer(vocab_size=n_ranks, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=cfg.verbose, special_tokens=[])
    tok.train_from_iterator(texts(), trainer)
    stats.skipped = dict(stats.skipped)
    if not stats.documents:
        raise ValueError(f"no training text found in {len(paths)} input file(s) "
                         f"({sum(stats.skipped.values())} documents skipped as bad input)")
    vocab = tok.get_vocab()
    if len(vocab) < n_ranks:
        raise ValueError(f"the sample only supports {len(vocab) + len(cfg.special_tokens)} tokens: lower --vocab-size "
                         f"(sampled {stats.documents} documents)")
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Written in a private folder next to the outputs, then renamed: no half-written tokenizer.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tok-partial-") as tmp:
        ranks = os.path.join(tmp, "m.tiktoken")
        with open(ranks, "w") as f:
            for piece, rank in sorted(vocab.items(), key=lambda kv: kv[1]):
                f.write(f"{base64.b64encode(bytes(to_byte[c] for c in piece)).decode()} {rank}\n")
        side = {"pattern": cfg.pattern, "special_tokens": list(cfg.special_tokens), "eod": cfg.special_tokens[0]}
        with open(ranks + ".yaml", "w", encoding="utf-8") as f:
            f.write("# written by kla-train-tokenizer --model-type byte-bpe (data_tools/README.md, Tokenizers)\n")
            yaml.safe_dump(side, f, sort_keys=False, allow_unicode=True, width=1 << 16)
        trained = load(ranks)  # the loader every command uses: what it reads is what we describe
        mismatches = sum(trained.decode(trained.encode(d)) != d for d in check_docs)
        desc = {
            "model_file": os.path.basename(cfg.output_prefix) + ".tiktoken",
            "model_type": "byte-bpe",
            "vocab_size": trained.vocab_size,
            "pattern": cfg.pattern,
            "special_tokens": {t: trained.specials[t] for t in cfg.special_tokens},
            "eod": {"id": trained.eod, "piece": cfg.special_tokens[0]},
            "lossless": True,
            "round_trip_check": {"documents": len(check_docs), "mismatches": mismatches},
            "training_data": {"inputs": [os.path.abspath(p) for p in paths], "format": cfg.input_format,
                              "json_key": cfg.json_key, "seed": cfg.seed,
                              "sample_bytes_per_shard": cfg.sample_bytes_per_shard, "max_shards": cfg.max_shards,
                              **asdict(stats)},
            "seconds": round(time.perf_counter() - start, 3),
            "tokenizers_version": tokenizers.__version__,
            "created_by": "data_tools.train_byte_bpe",
        }
        with open(os.path.join(tmp, "m.json"), "w", encoding="utf-8") as f:
            json.dump(desc, f, indent=2, ensure_ascii=False)
        for src, suffix in ((ranks + ".yaml", ".tiktoken.yaml"), (os.path.join(tmp, "m.json"), ".json"),
                            (ranks, ".tiktoken")):
            shutil.move(src, cfg.output_prefix + suffix)
    if mismatches:
        print(f"warning: {mismatches}/{len(check_docs)} documents did not round-trip exactly", file=sys.stderr)
    return desc
