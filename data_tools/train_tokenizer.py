"""Train a tokenizer on JSONL or plain-text corpora: sentencepiece (BPE or unigram), or a
byte-level BPE written as a tiktoken rank file (``--model-type byte-bpe``, ``train_byte_bpe.py``).

Writes ``<prefix>.model``, ``<prefix>.vocab`` and ``<prefix>.json`` (what was trained, on
what, and the special-token ids). Defaults are lossless: identity normalisation, no
whitespace folding, byte fallback, and ``\\n`` as its own piece, so
``decode(encode(text)) == text`` for any text; ``--normalization``/
``--remove-extra-whitespaces``/``--no-byte-fallback`` make it lossy on request.

Documents come from every input shard: with ``--sample-bytes-per-shard N`` (default 64 MiB)
about N bytes of each, a seeded uniform sample of its documents (each kept with probability
N / the shard's text size, reading stops once N bytes are kept), so a corpus of many large
shards is sampled evenly instead of read whole or from its first file; ``--max-shards K`` reads a seeded
choice of K shards. Training sentences are the non-empty lines of those documents; a uniform
sample (reservoir, ``--seed``) of at most ``--max-sentences`` of them is kept in memory. The
same inputs and seed give the same sample.

    python -m data_tools.train_tokenizer --input 'corpus/*.jsonl' --vocab-size 32000 \\
        --output-prefix tok/corpus32k
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Iterator, List, Optional, Tuple

from .inputs import FORMATS, POLICIES, TEXT_MODES, BadInputError, Problem, decode_document, expand_inputs, \
    iter_raw_documents, resolve_format

NORMALIZATIONS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")
MODEL_TYPES = ("bpe", "unigram", "byte-bpe")
ROUND_TRIP_CHECK_DOCS = 1000


@dataclass(kw_only=True)
class TokenizerConfig:
    """One tokenizer training job."""

    inputs: List[str]
    """Input files or globs."""
    output_prefix: str
    """Writes ``<output_prefix>.model/.vocab/.json``."""
    input_format: str = "auto"
    json_key: str = "text"
    text_mode: str = "line"
    model_type: str = "bpe"
    """``bpe``/``unigram``: sentencepiece; ``byte-bpe``: a tiktoken rank file (``train_byte_bpe.py``)."""
    vocab_size: int = 32000
    character_coverage: float = 0.9999
    """Fraction of characters covered by pieces; the rest fall back to bytes."""
    byte_fallback: bool = True
    """Encode characters outside the vocabulary as UTF-8 byte pieces (needed to be lossless)."""
    max_sentences: int = 2_000_000
    """Training sample size (lines)."""
    max_sentence_length: int = 16384
    """Longer lines (in bytes) are left out of the sample and counted."""
    max_documents: Optional[int] = None
    """Stop reading after this many good documents (default: read everything)."""
    sample_bytes_per_shard: int = 64 << 20
    """Bytes of documents sampled from each input file (0: every document)."""
    max_shards: Optional[int] = None
    """Read a seeded choice of this many input files (default: all)."""
    seed: int = 0
    unk_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    """The EOS piece ``</s>`` is the EOD token of preprocessed datasets."""
    pad_id: int = 3
    """-1 for no pad piece (as for bos_id)."""
    user_defined_symbols: List[str] = field(default_factory=list)
    """Pieces always kept whole (e.g. chat markers)."""
    control_symbols: List[str] = field(default_factory=list)
    """Pieces only inserted by id, never produced from text."""
    newline_symbol: bool = True
    """Make ``\\n`` a piece of its own (training sentences are lines, so it is never learned)."""
    normalization: str = "identity"
    remove_extra_whitespaces: bool = False
    add_dummy_prefix: bool = True
    split_digits: bool = True
    pattern: str = "nanochat"
    """byte-bpe: the pre-tokenizer, a preset name of kla_megatron/tokenizers/tiktoken_bpe.py or a regex."""
    special_tokens: List[str] = field(default_factory=lambda: ["<|endoftext|>"])
    """byte-bpe: special tokens, ids after the ranks; the first is the EOD token."""
    num_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    on_error: str = "skip"
    overwrite: bool = False
    verbose: bool = False

    def __post_init__(self):
        for name, value, allowed in (("--input-format", self.input_format, FORMATS),
                                     ("--text-mode", self.text_mode, TEXT_MODES),
                                     ("--model-type", self.model_type, MODEL_TYPES),
                                     ("--normalization", self.normalization, NORMALIZATIONS),
                                     ("--on-error", self.on_error, POLICIES)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.vocab_size < 8:
            raise ValueError(f"--vocab-size must be >= 8, got {self.vocab_size}")
        if not 0.0 < self.character_coverage <= 1.0:
            raise ValueError(f"--character-coverage must be in (0, 1], got {self.character_coverage}")
        if self.max_sentences < 1:
            raise ValueError(f"--max-sentences must be >= 1, got {self.max_sentences}")
        if self.sample_bytes_per_shard < 0:
            raise ValueError(f"--sample-bytes-per-shard must be >= 0 (0 reads everything), got "
                             f"{self.sample_bytes_per_shard}")
        if self.max_shards is not None and self.max_shards < 1:
            raise ValueError(f"--max-shards must be >= 1, got {self.max_shards}")
        if self.model_type == "byte-bpe" and (not self.special_tokens or
                                              len(set(self.special_tokens)) != len(self.special_tokens)):
            raise ValueError(f"--special-tokens must list distinct tokens, the first being the EOD token; got "
                             f"{self.special_tokens}")
        if self.eos_id < 0:
            raise ValueError("--eos-id must be >= 0: preprocess uses the EOS piece as the EOD token")
        ids = [i for i in (self.unk_id, self.bos_id, self.eos_id, self.pad_id) if i >= 0]
        if len(set(ids)) != len(ids):
            raise ValueError(f"special token ids must differ, got unk={self.unk_id} bos={self.bos_id} "
                             f"eos={self.eos_id} pad={self.pad_id}")

    @property
    def lossless(self) -> bool:
        return self.normalization == "identity" and not self.remove_extra_whitespaces and self.byte_fallback


@dataclass
class SampleStats:
    shards: int = 0
    sampled_bytes: int = 0
    documents: int = 0
    sentences_seen: int = 0
    sentences_sampled: int = 0
    too_long: int = 0
    skipped: dict = field(default_factory=dict)


def pick_shards(cfg: TokenizerConfig, paths: List[str]) -> List[str]:
    """All input files, or a seeded choice of ``max_shards`` of them (in input order)."""
    if cfg.max_shards is None or cfg.max_shards >= len(paths):
        return list(paths)
    picked = random.Random(f"{cfg.seed}:shards").sample(range(len(paths)), cfg.max_shards)
    return [paths[i] for i in sorted(picked)]


def _text_size(path: str, fmt: str, column: str) -> int:
    """Bytes of text in a shard, as well as is cheap to know: parquet's metadata gives the text
    column's uncompressed size; other files count their size on disk (an underestimate for
    .gz/.zst/.xz, whose sample then leans to the start of the file)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        sizes = [meta.row_group(g).column(c).total_uncompressed_size for g in range(meta.num_row_groups)
                 for c in range(meta.num_columns) if meta.row_group(g).column(c).path_in_schema == column]
        if sizes:
            return sum(sizes)
    return os.path.getsize(path)


def shard_documents(cfg: TokenizerConfig, path: str, fmt: str) -> Iterator[Tuple[int, bytes]]:
    """``(line, raw)`` of the documents of one shard that training reads: all of them, or each
    with probability budget / text size (``_text_size``; seeded by the seed and the file's name, so a shard's
    sample does not depend on the other shards) until the budget's bytes are kept."""
    docs = iter_raw_documents(path, fmt, cfg.text_mode, column=cfg.json_key)
    budget = cfg.sample_bytes_per_shard
    if not budget:
        yield from docs
        return
    rng = random.Random(f"{cfg.seed}:{os.path.basename(path)}")
    keep = min(1.0, budget / max(1, _text_size(path, fmt, cfg.json_key)))
    kept = 0
    for lineno, raw in docs:
        if keep < 1.0 and rng.random() >= keep:
            continue
        yield lineno, raw
        kept += len(raw)
        if kept >= budget:
            return


def sampled_texts(cfg: TokenizerConfig, paths: List[str], stats: SampleStats) -> Iterator[str]:
    """The good documents of every shard's sample, in order (bad ones reported and counted in
    ``stats.skipped``, or raised under ``--on-error fail``), up to ``max_documents``."""
    skipped: Counter = Counter()
    stats.skipped = skipped
    for path in pick_shards(cfg, paths):
        fmt = resolve_format(path, cfg.input_format)
        stats.shards += 1
        for lineno, raw in shard_documents(cfg, path, fmt):
            stats.sampled_bytes += len(raw)
            text, kind, detail = decode_document(raw, fmt, cfg.json_key)
            if text is None:
                problem = Problem(path, lineno, kind, detail)
                if cfg.on_error == "fail":
                    raise BadInputError(problem)
                skipped[kind] += 1
                if sum(skipped.values()) <= 20:
                    print(f"skipped {problem}", file=sys.stderr)
                continue
            stats.documents += 1
            yield text
            if cfg.max_documents is not None and stats.documents >= cfg.max_documents:
                return


def sample_sentences(cfg: TokenizerConfig, paths: List[str]):
    """Reservoir-sample training lines from the shards' samples; also keep a few whole documents
    for the round-trip check."""
    rng = random.Random(cfg.seed)
    sample: List[str] = []
    check_docs: List[str] = []
    stats = SampleStats()
    for text in sampled_texts(cfg, paths, stats):
        if len(check_docs) < ROUND_TRIP_CHECK_DOCS:
            check_docs.append(text)
        for line in text.split("\n"):
            if not line.strip():
                continue
            if len(line.encode("utf-8")) > cfg.max_sentence_length:
                stats.too_long += 1
                continue
            stats.sentences_seen += 1
            if len(sample) < cfg.max_sentences:
                sample.append(line)
            else:
                j = rng.randrange(stats.sentences_seen)
                if j < cfg.max_sentences:
                    sample[j] = line
    stats.sentences_sampled = len(sample)
    stats.skipped = dict(stats.skipped)
    if not sample:
        raise ValueError(f"no training text found in {len(paths)} input file(s) "
                         f"({sum(stats.skipped.values())} documents skipped as bad input)")
    return sample, check_docs, stats


def _trainer_kwargs(cfg: TokenizerConfig, model_prefix: str) -> dict:
    user_symbols = (["\n"] if cfg.newline_symbol else []) + list(cfg.user_defined_symbols)
    return dict(
        model_prefix=model_prefix,
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        normalization_rule_name=cfg.normalization,
        remove_extra_whitespaces=cfg.remove_extra_whitespaces,
        add_dummy_prefix=cfg.add_dummy_prefix,
        split_digits=cfg.split_digits,
        # Code indentation and runs of spaces are real text: let them be pieces.
        allow_whitespace_only_pieces=True,
        max_sentence_length=cfg.max_sentence_length,
        # We sampled already; sentencepiece must take all of it.
        input_sentence_size=0,
        shuffle_input_sentence=False,
        seed_sentencepiece_size=max(1_000_000, cfg.vocab_size * 10),
        unk_id=cfg.unk_id, bos_id=cfg.bos_id, eos_id=cfg.eos_id, pad_id=cfg.pad_id,
        user_defined_symbols=user_symbols,
        control_symbols=list(cfg.control_symbols),
        num_threads=max(1, cfg.num_threads),
        minloglevel=0 if cfg.verbose else 2,
        # A sample too small for the vocabulary is an error, not a smaller vocabulary.
        hard_vocab_limit=True,
    )


def output_suffixes(cfg: TokenizerConfig) -> tuple:
    if cfg.model_type == "byte-bpe":
        from .train_byte_bpe import SUFFIXES

        return SUFFIXES
    return (".model", ".vocab", ".json")


def _check_outputs_free(cfg: TokenizerConfig) -> None:
    for ext in output_suffixes(cfg):
        if os.path.exists(cfg.output_prefix + ext) and not cfg.overwrite:
            raise ValueError(f"{cfg.output_prefix + ext} already exists; pass --overwrite to replace it")


def train_tokenizer(cfg: TokenizerConfig) -> dict:
    """Train, write ``.model/.vocab/.json`` (``.tiktoken/.tiktoken.yaml/.json`` for byte-bpe),
    and return the JSON description."""
    import sentencepiece as spm

    paths = expand_inputs(cfg.inputs)
    _check_outputs_free(cfg)
    if cfg.model_type == "byte-bpe":
        from .train_byte_bpe import train_byte_bpe

        return train_byte_bpe(cfg, paths)
    start = time.perf_counter()
    sample, check_docs, stats = sample_sentences(cfg, paths)
    out_dir = os.path.dirname(os.path.abspath(cfg.output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # Train into a private folder next to the outputs, then rename: no half-written model.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".tok-partial-") as tmp:
        tmp_prefix = os.path.join(tmp, "m")
        try:
            spm.SentencePieceTrainer.train(sentence_iterator=iter(sample), **_trainer_kwargs(cfg, tmp_prefix))
        except RuntimeError as e:
            raise ValueError(f"sentencepiece training failed: {str(e).rstrip('.')}. With a small corpus, lower "
                             f"--vocab-size (sampled {stats.sentences_sampled} lines)") from e
        sp = spm.SentencePieceProcessor(model_file=tmp_prefix + ".model")
        mismatches = sum(sp.decode(sp.encode(d)) != d for d in check_docs)
        description = _describe(cfg, sp, paths, stats, mismatches, len(check_docs), time.perf_counter() - start)
        with open(tmp_prefix + ".json", "w", encoding="utf-8") as f:
            json.dump(description, f, indent=2, ensure_ascii=False)
        for ext in (".vocab", ".json", ".model"):
            shutil.move(tmp_prefix + ext, cfg.output_prefix + ext)
    if mismatches and cfg.lossless:
        print(f"warning: {mismatches}/{len(check_docs)} documents did not round-trip exactly", file=sys.stderr)
    return description


def _describe(cfg, sp, paths, stats, mismatches, checked, seconds) -> dict:
    import sentencepiece as spm

    def special(i):
        return None if i < 0 else {"id": i, "piece": sp.id_to_piece(i)}

    return {
        "model_file": os.path.basename(cfg.output_prefix) + ".model",
        "model_type": cfg.model_type,
        "vocab_size": sp.get_piece_size(),
        "special_tokens": {"unk": special(sp.unk_id()), "bos": special(sp.bos_id()), "eos": special(sp.eos_id()),
                           "pad": special(sp.pad_id()), "eod": special(sp.eos_id())},
        "user_defined_symbols": (["\n"] if cfg.newline_symbol else []) + list(cfg.user_defined_symbols),
        "control_symbols": list(cfg.control_symbols),
        "normalization": cfg.normalization,
        "remove_extra_whitespaces": cfg.remove_extra_whitespaces,
        "byte_fallback": cfg.byte_fallback,
        "character_coverage": cfg.character_coverage,
        "add_dummy_prefix": cfg.add_dummy_prefix,
        "split_digits": cfg.split_digits,
        "lossless": cfg.lossless,
        "round_trip_check": {"documents": checked, "mismatches": mismatches},
        "training_data": {"inputs": [os.path.abspath(p) for p in paths], "format": cfg.input_format,
                          "json_key": cfg.json_key, "seed": cfg.seed,
                          "sample_bytes_per_shard": cfg.sample_bytes_per_shard, "max_shards": cfg.max_shards,
                          **asdict(stats)},
        "seconds": round(seconds, 3),
        "sentencepiece_version": spm.__version__,
        "created_by": "data_tools.train_tokenizer",
    }


def _size(text: str) -> int:
    """``1048576``, ``64K``, ``64M``, ``2G`` (binary units) -> bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size like 64M, 1G or 1048576, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kla-train-tokenizer", description=__doc__.split("\n\n")[0].replace("``", "`"),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help="input files or globs (quote globs)")
    p.add_argument("--output-prefix", required=True, help="writes <prefix>.model, <prefix>.vocab, <prefix>.json")
    p.add_argument("--input-format", choices=FORMATS, default="auto")
    p.add_argument("--json-key", "--text-column", dest="json_key", default="text",
                   help="JSONL field or parquet column with the text")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="line", help="plain text: what a document is")
    p.add_argument("--model-type", choices=MODEL_TYPES, default="bpe",
                   help="bpe/unigram: a sentencepiece .model; byte-bpe: a byte-level BPE as a tiktoken rank file "
                        "+ sidecar (GPT-4/nanochat style)")
    p.add_argument("--pattern", default="nanochat",
                   help="byte-bpe: pre-tokenizer, a preset (gpt2, cl100k_base, o200k_base, llama3, nanochat) "
                        "or a regex")
    p.add_argument("--special-tokens", nargs="+", default=["<|endoftext|>"],
                   help="byte-bpe: special tokens, ids after the ranks; the first is the EOD token")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--character-coverage", type=float, default=0.9999)
    p.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                   help="unknown characters become <unk> (lossy)")
    p.add_argument("--max-sentences", type=int, default=2_000_000, help="training sample size, in lines")
    p.add_argument("--max-sentence-length", type=int, default=16384, help="longer lines (bytes) are not sampled")
    p.add_argument("--max-documents", type=int, default=None, help="read at most this many documents")
    p.add_argument("--sample-bytes-per-shard", type=_size, default=64 << 20, metavar="SIZE",
                   help="bytes of documents sampled from each input file (seeded, uniform over the file), "
                        "e.g. 64M or 1G; 0 reads every document")
    p.add_argument("--max-shards", type=int, default=None, help="read a seeded choice of this many input files")
    p.add_argument("--seed", type=int, default=0)
    for name, default in (("unk", 0), ("bos", 1), ("eos", 2), ("pad", 3)):
        p.add_argument(f"--{name}-id", type=int, default=default,
                       help=f"id of the {name} piece" + ("" if name in ("unk", "eos") else "; -1 for none"))
    p.add_argument("--user-defined-symbols", nargs="*", default=[], help="pieces always kept whole")
    p.add_argument("--control-symbols", nargs="*", default=[], help="pieces only inserted by id")
    p.add_argument("--no-newline-symbol", dest="newline_symbol", action="store_false",
                   help="do not reserve a piece for '\\n' (it then falls back to a byte)")
    p.add_argument("--normalization", choices=NORMALIZATIONS, default="identity",
                   help="anything but identity is lossy")
    p.add_argument("--remove-extra-whitespaces", action="store_true", help="fold whitespace runs (lossy)")
    p.add_argument("--no-dummy-prefix", dest="add_dummy_prefix", action="store_false",
                   help="do not prepend a space to each text before encoding")
    p.add_argument("--no-split-digits", dest="split_digits", action="store_false",
                   help="allow multi-digit pieces")
    p.add_argument("--num-threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--on-error", choices=POLICIES, default="skip", help="bad documents: skip (report, count) or fail")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show sentencepiece's own log")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    cfg_kwargs = vars(build_parser().parse_args(argv))
    try:
        desc = train_tokenizer(TokenizerConfig(**cfg_kwargs))
    except ValueError as e:
        print(f"kla-train-tokenizer: error: {e}", file=sys.stderr)
        return 1
    td = desc["training_data"]
    files = "/".join(output_suffixes(TokenizerConfig(**cfg_kwargs)))
    lines = ("" if desc["model_type"] == "byte-bpe"
             else f", {td['sentences_sampled']}/{td['sentences_seen']} lines sampled")
    print(f"wrote {cfg_kwargs['output_prefix']}{files}: {desc['model_type']} vocab {desc['vocab_size']}, "
          f"{td['documents']} documents{lines}, "
          f"{sum(td['skipped'].values())} bad documents skipped, round trip "
          f"{desc['round_trip_check']['documents'] - desc['round_trip_check']['mismatches']}"
          f"/{desc['round_trip_check']['documents']} exact, {desc['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
