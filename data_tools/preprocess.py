"""JSONL, plain text, parquet or a Hugging Face dataset -> megatron-core indexed dataset
(``.bin`` + ``.idx``).

Pipeline: one reader (this process) cuts the inputs into work items of whole documents
(``work.py``: chunks of lines, parquet row groups, batches of rows), ``--workers``
processes decode and tokenize them (``encode.py``), and this process writes the results
in input order through megatron-core's ``IndexedDatasetBuilder``. At most
``2 * workers`` items are in flight, so memory stays flat however large the input is;
only the index (8 bytes per sequence and per document) grows with the corpus.

Bad documents are reported with ``file:line`` (``file:row N`` for rows) and skipped or
fatal (``--on-error``); a dataset more than ``--max-bad-fraction`` of whose documents were
bad is not written. With ``--shard-outputs`` each input file becomes its own dataset with
a completion marker, a rerun skips finished ones, and ``--merge`` joins them
(``shards.py``).

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
from array import array
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from .atomic import check_output_free, commit_dataset, partial_paths, remove_partials
from .encode import EncodedChunk, init_worker
from .inputs import FORMATS, POLICIES, TEXT_MODES, BadInputError, Problem
from .parquet_input import close_cached
from .progress import Progress
from .shards import ShardOutputs
from .work import Shard, ShardStart, check_shard, encode_item, file_shards, iter_items

MAX_BAD_FRACTION = 0.1
"""Default of ``--max-bad-fraction``: a dataset with more bad documents than this is not written."""


@dataclass(kw_only=True)
class PreprocessConfig:
    """Everything one preprocess run needs."""

    inputs: List[str] = field(default_factory=list)
    """Input files, globs or directories, in the order given (globs and directories sorted)."""
    tokenizer_model: str
    """Tokenizer file or folder (any ``kla_megatron.tokenizers`` kind); its EOD id ends each document."""
    output_prefix: str
    """Output name stem; files are ``<output_prefix>_<json_key>_<level>.bin/.idx``."""
    input_format: str = "auto"
    """``jsonl``, ``text`` or ``auto`` (by file extension)."""
    json_key: str = "text"
    """JSONL field, or parquet / Hugging Face column (``--text-column``), holding the document text."""
    hf_dataset: Optional[str] = None
    """Instead of ``inputs``: a ``save_to_disk`` folder or a ``load_dataset`` path or hub name."""
    hf_split: str = "train"
    hf_config: Optional[str] = None
    """``load_dataset``'s configuration name (e.g. ``sample-10BT``)."""
    hf_data_files: Optional[List[str]] = None
    """``load_dataset``'s ``data_files`` (with a builder name such as ``json`` or ``parquet``)."""
    streaming: bool = False
    """Stream a ``load_dataset`` dataset instead of preparing its Arrow cache first."""
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
    """Optional JSONL file listing every bad document (path, line or row, kind, detail)."""
    max_bad_fraction: float = MAX_BAD_FRACTION
    """A dataset with a larger fraction of bad documents is not written (the run fails)."""
    shard_outputs: bool = False
    """One dataset per input file under ``<output_prefix>_shards/`` with completion markers; reruns resume."""
    merge: bool = False
    """With ``shard_outputs``: merge the shards into ``dataset_prefix`` once all are finished."""
    task_index: int = 0
    """With ``shard_outputs``: process the shards ``i`` with ``i % task_count == task_index``."""
    task_count: int = 1

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
        if bool(self.inputs) == bool(self.hf_dataset):
            raise ValueError("give the input as --input FILES or as --hf-dataset NAME (one of them)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"--max-bad-fraction must be between 0 and 1, got {self.max_bad_fraction}")
        if not 0 <= self.task_index < self.task_count:
            raise ValueError(f"--task-index must be in [0, --task-count), got {self.task_index} of {self.task_count}")
        if (self.merge or self.task_count > 1) and not self.shard_outputs:
            raise ValueError("--merge and --task-count need --shard-outputs")
        if self.shard_outputs and self.hf_dataset:
            raise ValueError("--shard-outputs works on --input files; save the dataset as parquet shards first")
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
    shards_total: int = 0
    shards_skipped: int = 0
    merged: Optional[dict] = None  # merge.merge_datasets' counts, with --merge

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
            f"encoder        {self.encoder or '-'}",
            f"input          {self.input_bytes / 1e6:.2f} MB in {self.seconds:.2f} s "
            f"({d['mb_per_s']:.2f} MB/s, {d['docs_per_s']:.0f} docs/s)",
            f"skipped        {self.skipped_total}"
            + "".join(f"\n  {k:<16} {v}" for k, v in sorted(self.skipped.items())),
        ]
        if self.shards_total:
            m = self.merged
            state = (f"all shards merged: {m['documents']} documents, {m['tokens']} tokens" if m
                     else "per-shard datasets, not merged (pass --merge)")
            lines[0] = f"dataset        {self.dataset_prefix}  ({state}, dtype {self.dtype})"
            lines.insert(1, f"shards         {self.shards_total} ({self.shards_skipped} already finished, "
                            f"{self.files} done now; the counts below are this run's)")
        return "\n".join(lines)


Encoded = Tuple[Optional[ShardStart], int, Optional[EncodedChunk]]
"""What the writer gets, in input order: a shard's start mark, or an item's disk bytes and result."""


def _iter_work(shards: List[Shard], cfg: PreprocessConfig, hf_dataset=None):
    for shard in shards:
        yield ShardStart(shard)
        yield from iter_items(shard, cfg, hf_dataset)


def _encode_in_order(items: Iterable, cfg: PreprocessConfig, dtype: str) -> Iterator[Encoded]:
    init_args = (cfg.tokenizer_model, cfg.json_key, cfg.split_sentences, dtype)
    if cfg.workers == 1:
        init_worker(*init_args)
        try:
            for item in items:
                yield (item, 0, None) if isinstance(item, ShardStart) else (None, item.disk_bytes, encode_item(item))
        finally:
            close_cached()  # the parquet file this process read row groups from
        return
    # spawn: workers start clean (no copy of torch/megatron state, no fork-with-threads
    # hazards) and import only numpy, the tokenizer libraries and (for parquet) pyarrow.
    # ProcessPoolExecutor, not multiprocessing.Pool: Pool's worker-handler thread polls the
    # result pipe too and spins while a large result is being read (~1 CPU s per 400 MB).
    pool = ProcessPoolExecutor(cfg.workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=init_worker, initargs=init_args)
    try:
        # A bounded window of futures instead of Executor.map, which submits the whole
        # input at once and so breaks the memory bound. Only small descriptions of the
        # items in flight stay here, not their documents.
        window: deque = deque()
        for item in items:
            if isinstance(item, ShardStart):
                window.append((item, 0, None))
            else:
                window.append((None, item.disk_bytes, pool.submit(encode_item, item)))
            if len(window) >= 2 * cfg.workers:
                yield _resolved(window.popleft())
        while window:
            yield _resolved(window.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _resolved(entry) -> Encoded:
    mark, disk_bytes, pending = entry
    return mark, disk_bytes, None if pending is None else pending.result()


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
            self.log.write(json.dumps(problem.to_dict()) + "\n")

    def close(self) -> None:
        if self.log:
            self.log.close()


def preprocess(cfg: PreprocessConfig) -> Summary:
    """Run one preprocess job; returns its summary. Raises BadInputError under ``fail``."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    source = _Source(cfg)  # inputs checked (binaries refused, parquet columns) before anything is written
    paths = source.todo
    prefix = source.summary_prefix
    from kla_megatron.tokenizers import load as load_tokenizer

    tok = load_tokenizer(cfg.tokenizer_model)  # one-line ValueError for an unknown or broken file
    vocab_size = tok.vocab_size
    dtype = DType.optimal_dtype(vocab_size)
    summary = Summary(prefix, files=len(paths), dtype=np.dtype(dtype).name, vocab_size=vocab_size, eod=tok.eod)

    return _run(cfg, source, summary, IndexedDatasetBuilder, dtype)


class _Source:
    """The run's shards (input files, or one Hugging Face dataset) and which of them this
    run processes; every one of those is checked before anything is written."""

    def __init__(self, cfg: PreprocessConfig):
        self.hf, self.outputs, self.skipped = None, None, 0
        writes_final = not cfg.shard_outputs or cfg.merge
        if writes_final:  # before any (possibly long) loading
            check_output_free(cfg.dataset_prefix, cfg.overwrite)
        if cfg.hf_dataset:
            from . import hf_input

            self.hf = hf_input.load(cfg.hf_dataset, cfg.hf_split, cfg.hf_config, cfg.hf_data_files, cfg.streaming)
            hf_input.check_column(self.hf, cfg.hf_dataset, cfg.json_key)
            where = hf_input.label(cfg.hf_dataset, cfg.hf_split)
            self.shards = self.todo = [Shard(0, where, "hf", hf_input.total_bytes(self.hf, cfg.json_key))]
        else:
            self.shards = file_shards(cfg.inputs)
            todo = self.shards
            if cfg.shard_outputs:
                self.outputs = ShardOutputs(cfg, self.shards)
                mine = self.outputs.mine(cfg.task_index, cfg.task_count)
                todo = [s for s in mine if not self.outputs.is_done(s)]
                self.skipped = len(mine) - len(todo)
            self.todo = [check_shard(s, cfg.input_format, cfg.json_key) for s in todo]
        self.summary_prefix = cfg.dataset_prefix if writes_final else self.outputs.directory

    @property
    def total_bytes(self) -> Optional[int]:
        sizes = [s.size for s in self.todo]
        return None if None in sizes else sum(sizes)


class _DatasetWriter:
    """One output dataset: written under partial names, checked, then committed."""

    def __init__(self, prefix: str, builder_cls, dtype, cfg: PreprocessConfig, what: str):
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix, self.cfg, self.what = prefix, cfg, what
        self.tmp_bin, self.tmp_idx = partial_paths(prefix)
        self.builder = builder_cls(self.tmp_bin, dtype=dtype)
        # The index is all that grows with the input: keep it as 8-byte arrays, not the
        # builder's lists of Python ints (~40 bytes an entry); finalize reads either.
        self.builder.sequence_lengths = array("q", self.builder.sequence_lengths)
        self.builder.document_indices = array("q", self.builder.document_indices)
        self.documents = self.sequences = self.tokens = 0
        self.bad: Counter = Counter()
        self.first_bad: Optional[Problem] = None

    def add(self, enc: EncodedChunk) -> None:
        _append_chunk(self.builder, enc)
        self.documents += len(enc.sequences_per_document)
        self.sequences += len(enc.sequence_lengths)
        self.tokens += len(enc.tokens)
        for p in enc.problems:
            self.bad[p.kind] += 1
            self.first_bad = self.first_bad or p

    def counts(self) -> dict:
        return {"documents": self.documents, "sequences": self.sequences, "tokens": self.tokens,
                "skipped": dict(self.bad)}

    def commit(self, allow_empty: bool = False) -> Optional[str]:
        """Put the dataset in place; None (nothing written) for an allowed empty one."""
        bad = sum(self.bad.values())
        total = bad + self.documents
        if bad > self.cfg.max_bad_fraction * total:
            kinds = ", ".join(f"{k} {v}" for k, v in self.bad.most_common())
            raise ValueError(f"{self.what}: {bad} of {total} documents were bad ({bad / total:.0%}: {kinds}; "
                             f"first: {self.first_bad}), more than --max-bad-fraction {self.cfg.max_bad_fraction:g}; "
                             "check the input format and --text-column, or pass --max-bad-fraction 1 "
                             f"to keep the {self.documents} good ones")
        if self.documents == 0:
            if allow_empty:
                return None
            raise ValueError(f"no documents left to write from {self.what} ({bad} skipped as bad input)")
        self.builder.finalize(self.tmp_idx)
        commit_dataset(self.tmp_bin, self.tmp_idx, self.prefix)
        return self.prefix

    def close(self) -> None:
        self.builder.data_file.close()
        remove_partials(self.tmp_bin, self.tmp_idx)


def _run(cfg: PreprocessConfig, source: _Source, summary: Summary, builder_cls, dtype) -> Summary:
    """Read, encode in order and write: one dataset, or one per shard with ``shard_outputs``."""
    outputs = source.outputs
    reporter = _ProblemReporter(cfg)
    progress = Progress(source.total_bytes) if cfg.progress else None
    writer: Optional[_DatasetWriter] = None
    shard: Optional[Shard] = None
    start = time.perf_counter()
    try:
        if outputs is None:
            writer = _DatasetWriter(cfg.dataset_prefix, builder_cls, dtype, cfg, f"{len(source.todo)} input(s)")
        for mark, disk_bytes, enc in _encode_in_order(_iter_work(source.todo, cfg, source.hf), cfg, np.dtype(dtype).name):
            if mark is not None:
                if outputs is not None:
                    _finish_shard(outputs, shard, writer)
                    shard = mark.shard
                    writer = _DatasetWriter(outputs.start(shard), builder_cls, dtype, cfg,
                                            f"shard {shard.index} ({shard.path})")
                continue
            for problem in enc.problems:
                reporter.add(problem)
            writer.add(enc)
            summary.documents += len(enc.sequences_per_document)
            summary.sequences += len(enc.sequence_lengths)
            summary.tokens += len(enc.tokens)
            summary.input_bytes += enc.nbytes
            summary.encoder = enc.encoder or summary.encoder
            if progress is not None:
                progress.update(disk_bytes, len(enc.sequences_per_document), len(enc.tokens))
        if outputs is None:
            writer.commit()
        else:
            _finish_shard(outputs, shard, writer)
            summary.shards_total, summary.shards_skipped = len(source.shards), source.skipped
            if cfg.merge:
                summary.merged = outputs.merge(cfg.dataset_prefix)
    finally:
        if progress is not None:
            progress.close()
        reporter.close()
        if writer is not None:
            writer.close()
    summary.seconds = time.perf_counter() - start
    summary.skipped = dict(reporter.counts)
    return summary


def _finish_shard(outputs: ShardOutputs, shard: Optional[Shard], writer: Optional[_DatasetWriter]) -> None:
    if shard is not None:
        outputs.finish(shard, writer.commit(allow_empty=True), writer.counts())
        writer.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kla-preprocess",
        description="Tokenize JSONL or plain text into a megatron-core indexed dataset (.bin + .idx), "
                    "one EOD token after each document.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_argument_group("input (--input or --hf-dataset)")
    src.add_argument("--input", dest="inputs", nargs="+", default=[],
                     help="input files, globs (quote them) or directories: JSONL, text or parquet, optionally "
                          ".gz/.zst/.xz; globs and directories are sorted")
    src.add_argument("--hf-dataset", default=None, metavar="PATH_OR_NAME",
                     help="a Hugging Face dataset: a save_to_disk folder, or what datasets.load_dataset opens "
                          "(a local folder of data files, a builder such as json/parquet with --hf-data-files, "
                          "or a hub name where the network allows)")
    src.add_argument("--hf-split", "--split", dest="hf_split", default="train", help="split of --hf-dataset")
    src.add_argument("--hf-config", default=None, help="configuration name of --hf-dataset (load_dataset's name)")
    src.add_argument("--hf-data-files", nargs="+", default=None, help="load_dataset's data_files")
    src.add_argument("--streaming", action="store_true",
                     help="stream --hf-dataset (load_dataset) instead of building its Arrow cache first")
    p.add_argument("--tokenizer", "--tokenizer-model", dest="tokenizer_model", required=True,
                   help="sentencepiece .model (from kla-train-tokenizer), Hugging Face tokenizer.json or its folder, "
                        "or tiktoken rank file; its EOD token ends each document (data_tools/README.md, Tokenizers)")
    p.add_argument("--output-prefix", required=True,
                   help="output stem; writes <prefix>_<json-key>_document.bin/.idx (_sentence with --split-sentences)")
    p.add_argument("--input-format", choices=FORMATS, default="auto",
                   help="auto = parquet for .parquet/.pq or parquet content, jsonl for .jsonl/.json/.ndjson "
                        "(also .gz/.zst/.xz), text otherwise; binary files are refused")
    p.add_argument("--json-key", "--text-column", dest="json_key", default="text",
                   help="JSONL field, or parquet / Hugging Face column, with the document text")
    p.add_argument("--text-mode", choices=TEXT_MODES, default="line",
                   help="plain text: a document is a line, a blank-line-separated paragraph, or a whole file")
    p.add_argument("--split-sentences", action="store_true",
                   help="store each sentence as its own sequence (rule-based, lossless splitter)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (output is identical for any count)")
    p.add_argument("--chunk-bytes", type=int, default=1 << 20, help="raw bytes per work item")
    p.add_argument("--on-error", choices=POLICIES, default="skip",
                   help="bad documents (malformed JSON, missing field, null or non-string value, invalid UTF-8, "
                        "empty): skip = report with file:line (file:row N), count, continue; fail = stop at the first")
    p.add_argument("--max-bad-fraction", type=float, default=MAX_BAD_FRACTION,
                   help="fail (exit 1, no dataset written) when more than this fraction of a dataset's documents "
                        "are bad: a wrong format or column, not a few broken lines; 1 keeps whatever is good")
    p.add_argument("--bad-lines-log", default=None, help="write every bad document as a JSON line here")
    p.add_argument("--report-limit", type=int, default=20, help="bad documents printed to stderr")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset of the same name")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--summary-json", default=None, help="also write the summary as JSON to this file")
    sh = p.add_argument_group("per-shard outputs (resumable; data_tools/README.md, Shards)")
    sh.add_argument("--shard-outputs", action="store_true",
                    help="write each input file as its own dataset under <output-prefix>_shards/ with a completion "
                         "marker; a rerun skips finished shards")
    sh.add_argument("--merge", action="store_true",
                    help="with --shard-outputs: merge all shards into <prefix>_<key>_document when all are finished")
    sh.add_argument("--task-index", type=int, default=0,
                    help="with --shard-outputs: this task processes the shards i with i %% task-count == task-index "
                         "(e.g. $SLURM_ARRAY_TASK_ID)")
    sh.add_argument("--task-count", type=int, default=1, help="number of tasks sharing the shards")
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
        kept = "finished shards are kept and a rerun resumes" if args["shard_outputs"] else "no dataset was written"
        print(f"kla-preprocess: error: {msg}; {kept}", file=sys.stderr)
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
