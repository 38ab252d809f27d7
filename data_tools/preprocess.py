"""JSONL / plain text -> megatron-core indexed dataset (``.bin`` + ``.idx``).

Pipeline: one reader (this process) cuts the inputs into chunks of whole documents,
``--workers`` processes decode and tokenize them (``encode.py``), and this process writes
the results in input order through megatron-core's ``IndexedDatasetBuilder``. At most
``2 * workers`` chunks are in flight, so memory stays flat however large the input is;
only the index (a few bytes per sequence) grows with the corpus.

Crash safety: data and index are written under ``<name>.bin.partial-<pid>`` /
``<name>.idx.partial-<pid>`` and renamed into place only after the index is complete
(the old ``.idx`` is removed first, so an overwritten dataset never pairs an old index
with new data). An interrupted run leaves no ``.bin``/``.idx`` pair at the output name.

Output name, as in Megatron-LM: ``<output-prefix>_<json-key>_document`` (or ``_sentence``
with ``--split-sentences``); pass that prefix to training.

    python -m data_tools.preprocess --input 'corpus/*.jsonl' --tokenizer tok.model \\
        --output-prefix data/corpus --workers 8
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional

import numpy as np

from .atomic import check_output_free, commit_dataset, partial_paths, remove_partials
from .encode import Chunk, EncodedChunk, encode_chunk, init_worker
from .inputs import (
    FORMATS,
    POLICIES,
    TEXT_MODES,
    BadInputError,
    Problem,
    expand_inputs,
    iter_raw_documents,
    resolve_format,
)


@dataclass(kw_only=True)
class PreprocessConfig:
    """Everything one preprocess run needs."""

    inputs: List[str]
    """Input files or globs, processed in the order given (globs sorted)."""
    tokenizer_model: str
    """Tokenizer file or folder (any ``kla_megatron.tokenizers`` kind); its EOD id ends each document."""
    output_prefix: str
    """Output name stem; files are ``<output_prefix>_<json_key>_<level>.bin/.idx``."""
    input_format: str = "auto"
    """``jsonl``, ``text`` or ``auto`` (by file extension)."""
    json_key: str = "text"
    """JSONL field holding the document text."""
    text_mode: str = "line"
    """For text inputs: a document is a ``line``, a ``paragraph`` or a whole ``file``."""
    split_sentences: bool = False
    """Store each sentence as its own sequence (documents still end with EOD)."""
    workers: int = 1
    """Tokenizer processes; output is identical for any number."""
    chunk_bytes: int = 1 << 20
    """Raw bytes per work item."""
    on_error: str = "skip"
    """Bad document policy: ``skip`` (report, count, continue) or ``fail`` (stop at the first)."""
    overwrite: bool = False
    """Replace an existing dataset of the same name."""
    progress: bool = True
    """Show a progress bar (bytes and documents per second) on stderr."""
    report_limit: int = 20
    """How many bad documents to print to stderr; all go to ``bad_lines_log``."""
    bad_lines_log: Optional[str] = None
    """Optional JSONL file listing every bad document (path, line, kind, detail)."""

    def __post_init__(self):
        if self.input_format not in FORMATS:
            raise ValueError(f"--input-format must be one of {FORMATS}, got {self.input_format!r}")
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"--text-mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if self.on_error not in POLICIES:
            raise ValueError(f"--on-error must be one of {POLICIES}, got {self.on_error!r}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.chunk_bytes < 1:
            raise ValueError(f"--chunk-bytes must be >= 1, got {self.chunk_bytes}")
        if not os.path.exists(self.tokenizer_model):
            raise ValueError(f"--tokenizer {self.tokenizer_model!r} does not exist")

    @property
    def dataset_prefix(self) -> str:
        level = "sentence" if self.split_sentences else "document"
        return f"{self.output_prefix}_{self.json_key}_{level}"


@dataclass
class Summary:
    """What a run did; printed at the end and returned to callers."""

    dataset_prefix: str
    files: int = 0
    documents: int = 0
    sequences: int = 0
    tokens: int = 0
    input_bytes: int = 0
    skipped: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    dtype: str = ""
    vocab_size: int = 0
    eod: int = -1
    encoder: str = ""

    @property
    def skipped_total(self) -> int:
        return sum(self.skipped.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["skipped_total"] = self.skipped_total
        d["mb_per_s"] = self.input_bytes / 1e6 / max(self.seconds, 1e-9)
        d["docs_per_s"] = self.documents / max(self.seconds, 1e-9)
        return d

    def format(self) -> str:
        d = self.to_dict()
        lines = [
            f"dataset        {self.dataset_prefix}  (.bin/.idx, dtype {self.dtype})",
            f"files          {self.files}",
            f"documents      {self.documents}",
            f"sequences      {self.sequences}",
            f"tokens         {self.tokens}  (EOD id {self.eod}, vocab {self.vocab_size})",
            f"encoder        {self.encoder}",
            f"input          {self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s "
            f"({d['mb_per_s']:.2f} MB/s, {d['docs_per_s']:.0f} docs/s)",
            f"skipped        {self.skipped_total}"
            + "".join(f"\n  {k:<13}{v}" for k, v in sorted(self.skipped.items())),
        ]
        return "\n".join(lines)


def _iter_chunks(paths: List[str], cfg: PreprocessConfig) -> Iterator[Chunk]:
    for path in paths:
        fmt = resolve_format(path, cfg.input_format)
        docs, size = [], 0
        for lineno, raw in iter_raw_documents(path, fmt, cfg.text_mode):
            docs.append((lineno, raw))
            size += len(raw)
            if size >= cfg.chunk_bytes:
                yield Chunk(path, fmt, docs)
                docs, size = [], 0
        if docs:
            yield Chunk(path, fmt, docs)


def _encode_in_order(chunks: Iterable[Chunk], cfg: PreprocessConfig) -> Iterator[EncodedChunk]:
    init_args = (cfg.tokenizer_model, cfg.json_key, cfg.split_sentences)
    if cfg.workers == 1:
        init_worker(*init_args)
        yield from map(encode_chunk, chunks)
        return
    # spawn: workers start clean (no copy of torch/megatron state, no fork-with-threads
    # hazards) and import only numpy + sentencepiece.
    pool = multiprocessing.get_context("spawn").Pool(cfg.workers, initializer=init_worker, initargs=init_args)
    try:
        # A bounded window of async results instead of Pool.imap: imap's feeder thread
        # reads the whole input ahead of the workers, which breaks the memory bound.
        window: deque = deque()
        for chunk in chunks:
            window.append(pool.apply_async(encode_chunk, (chunk,)))
            if len(window) >= 2 * cfg.workers:
                yield window.popleft().get()
        while window:
            yield window.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _append_chunk(builder, enc: EncodedChunk) -> None:
    """Append a whole chunk to an ``IndexedDatasetBuilder``.

    Equivalent to one ``builder.add_document(doc_tokens, doc_sequence_lengths)`` per
    document (the test suite reads the result back through ``IndexedDataset``), but with
    one write per chunk: per-document calls made this single writer the bottleneck.
    """
    builder.data_file.write(enc.tokens.astype(builder.dtype, copy=False).tobytes(order="C"))
    builder.sequence_lengths.extend(enc.sequence_lengths.tolist())
    base = len(builder.sequence_lengths) - len(enc.sequence_lengths)
    builder.document_indices.extend((base + np.cumsum(enc.sequences_per_document)).tolist())


class _ProblemReporter:
    """Counts bad documents, prints the first few with file:line, logs all if asked."""

    def __init__(self, cfg: PreprocessConfig):
        self.cfg = cfg
        self.counts: Counter = Counter()
        self.log = open(cfg.bad_lines_log, "w", encoding="utf-8") if cfg.bad_lines_log else None

    def add(self, problem: Problem) -> None:
        if self.cfg.on_error == "fail":
            raise BadInputError(problem)
        self.counts[problem.kind] += 1
        n = sum(self.counts.values())
        if n <= self.cfg.report_limit:
            print(f"skipped {problem}", file=sys.stderr)
        elif n == self.cfg.report_limit + 1:
            print("more bad documents are skipped silently here; they are counted in the summary"
                  + (f" and listed in {self.cfg.bad_lines_log}" if self.log else " (use --bad-lines-log)"),
                  file=sys.stderr)
        if self.log:
            self.log.write(json.dumps(asdict(problem)) + "\n")

    def close(self) -> None:
        if self.log:
            self.log.close()


def preprocess(cfg: PreprocessConfig) -> Summary:
    """Run one preprocess job; returns its summary. Raises BadInputError under ``fail``."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    paths = expand_inputs(cfg.inputs)
    prefix = cfg.dataset_prefix
    check_output_free(prefix, cfg.overwrite)
    from kla_megatron.tokenizers import load as load_tokenizer

    tok = load_tokenizer(cfg.tokenizer_model)  # one-line ValueError for an unknown or broken file
    vocab_size = tok.vocab_size
    dtype = DType.optimal_dtype(vocab_size)
    summary = Summary(prefix, files=len(paths), dtype=np.dtype(dtype).name, vocab_size=vocab_size, eod=tok.eod)

    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    tmp_bin, tmp_idx = partial_paths(prefix)
    reporter = _ProblemReporter(cfg)
    bar = _progress_bar(paths, cfg)
    start = time.perf_counter()
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        for enc in _encode_in_order(_iter_chunks(paths, cfg), cfg):
            for problem in enc.problems:
                reporter.add(problem)
            _append_chunk(builder, enc)
            summary.documents += len(enc.sequences_per_document)
            summary.sequences += len(enc.sequence_lengths)
            summary.tokens += len(enc.tokens)
            summary.input_bytes += enc.nbytes
            summary.encoder = enc.encoder
            if bar is not None:
                bar.update(enc.nbytes)
                bar.set_postfix(docs_per_s=f"{summary.documents / max(time.perf_counter() - start, 1e-9):.0f}",
                                refresh=False)
        if summary.documents == 0:
            raise ValueError(f"no documents left to write from {len(paths)} input file(s) "
                             f"({sum(reporter.counts.values())} skipped as bad input)")
        builder.finalize(tmp_idx)
        commit_dataset(tmp_bin, tmp_idx, prefix)
    finally:
        if bar is not None:
            bar.close()
        reporter.close()
        remove_partials(tmp_bin, tmp_idx)
    summary.seconds = time.perf_counter() - start
    summary.skipped = dict(reporter.counts)
    return summary


def _progress_bar(paths: List[str], cfg: PreprocessConfig):
    if not cfg.progress:
        return None
    from tqdm import tqdm

    # Compressed sizes do not measure decompressed progress: no total then.
    total = None if any(p.endswith(".gz") for p in paths) else sum(os.path.getsize(p) for p in paths)
    return tqdm(total=total, unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, mininterval=1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kla-preprocess",
        description="Tokenize JSONL or plain text into a megatron-core indexed dataset (.bin + .idx), "
                    "one EOD token after each document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input", dest="inputs", nargs="+", required=True, help="input files or globs (quote globs)")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer_model", required=True,
                   help="sentencepiece .model (from kla-train-tokenizer), Hugging Face tokenizer.json or its folder, "
                        "or tiktoken rank file; its EOD token ends each document (data_tools/README.md, Tokenizers)")
    p.add_argument("--output-prefix", required=True,
                   help="output stem; writes <prefix>_<json-key>_document.bin/.idx (_sentence with --split-sentences)")
    p.add_argument("--input-format", choices=FORMATS, default="auto",
                   help="auto = jsonl for .jsonl/.json/.ndjson[.gz], text otherwise")
    p.add_argument("--json-key", default="text", help="JSONL field with the document text")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="line",
                   help="plain text: a document is a line, a blank-line-separated paragraph, or a whole file")
    p.add_argument("--split-sentences", action="store_true",
                   help="store each sentence as its own sequence (rule-based, lossless splitter)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any count)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help="raw bytes per work item")
    p.add_argument("--on-error", choices=POLICIES, default="skip",
                   help="bad documents (malformed JSON, missing field, invalid UTF-8, empty): "
                        "skip = report with file:line, count, continue; fail = stop at the first")
    p.add_argument("--bad-lines-log", default=None, help="write every bad document as a JSON line here")
    p.add_argument("--report-limit", type=int, default=20, help="bad documents printed to stderr")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON to this file")
    return p


def _exit_on_sigterm(signum, frame):
    # Turn SIGTERM into SystemExit so `finally` removes the partial files.
    raise SystemExit(128 + signum)


def main(argv: Optional[List[str]] = None) -> int:
    args = vars(build_parser().parse_args(argv))
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    summary_json = args.pop("summary_json")
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        summary = preprocess(PreprocessConfig(**args))
    except (ValueError, KeyboardInterrupt) as e:
        msg = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        print(f"kla-preprocess: error: {msg}; no dataset was written", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 1
    except OSError as e:  # an unwritable or invalid output path, a full disk, an unreadable input
        where = f" ({e.filename})" if e.filename else ""
        print(f"kla-preprocess: error: {e.strerror or e}{where}; check --output-prefix "
              f"{args['output_prefix']!r} and the inputs; no dataset was written", file=sys.stderr)
        return 1
    print(summary.format())
    if summary_json:
        with open(summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
