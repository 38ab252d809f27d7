"""Preprocess throughput: MB/s per core for a 32k-vocabulary BPE tokenizer.

Corpus (no download): the Python standard library's ``.py`` files (code with English
comments and docstrings, one document per file) plus the ``pydoc_data`` documentation
topics repeated ``--english-repeat`` times (English prose). A 32k BPE tokenizer is trained
on it once (cached in ``--work-dir``), then ``data_tools.preprocess`` runs with each
worker count in ``--workers``. The encoders alone are timed on one core for comparison:
sentencepiece, the segment cache (``data_tools/cached_encode.py``, from cold) and tiktoken's
BPE with the model's rank table (``data_tools/tiktoken_encode.py``, what preprocess uses).

``--formats jsonl parquet`` also writes the same documents as parquet (``--row-group-docs``
per row group) and times both formats with each worker count, ``--rounds`` times
interleaved; rates are MB of document text per second, so both formats are measured on
the same bytes. ``--rss-gb G`` builds a parquet file of about G GB of text (``--rss-disk-gb G``:
about G GB on disk) and records the peak memory of a 2-worker run (reader/writer RSS, each
worker's USS, their sum).

    python bench/bench_preprocess.py --workers 1 2 --json-out bench/results/preprocess_cpu.json
    python bench/bench_preprocess.py --formats jsonl parquet --workers 1 2 --passes 4 --rounds 3 --rss-gb 2
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import sysconfig
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from data_tools.preprocess import PreprocessConfig, preprocess  # noqa: E402
from data_tools.sample_corpus import iter_records  # noqa: E402
from data_tools.train_tokenizer import TokenizerConfig, train_tokenizer  # noqa: E402


def build_corpus(path: str, english_repeat: int) -> str:
    if os.path.exists(path):
        return path
    lib = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(lib, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and os.sep + "test" not in f)
    tmp = path + ".partial"
    with open(tmp, "w", encoding="utf-8") as out:
        for f in files:
            try:
                text = open(f, encoding="utf-8").read()
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
        for rec in iter_records(english_repeat):
            out.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)
    return path


def write_parquet(corpus: str, path: str, row_group_docs: int, repeat: int = 1) -> str:
    """The corpus's documents (``repeat`` times) as a parquet file with one ``text`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    tmp = path + ".partial"
    with pq.ParquetWriter(tmp, pa.schema([("text", pa.string())])) as w:
        for _ in range(repeat):
            for i in range(0, len(texts), row_group_docs):
                w.write_table(pa.table({"text": texts[i:i + row_group_docs]}), row_group_size=row_group_docs)
    os.replace(tmp, path)
    return path


def text_bytes(corpus: str) -> int:
    return sum(len(json.loads(line)["text"].encode("utf-8")) for line in open(corpus, encoding="utf-8"))


def _rss_run(path: str, model: str, out: str, result_file: str) -> None:
    """In a child process: a 2-worker preprocess of ``path`` while a thread samples memory."""
    import threading

    import psutil

    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder  # noqa: F401

    me = psutil.Process()
    peak = {"main_rss": 0, "worker_uss": 0, "total": 0}
    done = threading.Event()

    def watch():
        while not done.is_set():
            main_rss = me.memory_info().rss
            workers = []
            for c in me.children(recursive=True):
                try:
                    workers.append(c.memory_full_info().uss)
                except psutil.Error:
                    pass
            peak["main_rss"] = max(peak["main_rss"], main_rss)
            peak["worker_uss"] = max([peak["worker_uss"], *workers])
            peak["total"] = max(peak["total"], main_rss + sum(workers))
            time.sleep(0.05)

    base = me.memory_info().rss
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    s = preprocess(PreprocessConfig(inputs=[path], tokenizer_model=model, output_prefix=out, workers=2,
                                    overwrite=True, progress=False))
    done.set()
    t.join()
    with open(result_file, "w") as f:
        json.dump({"base_rss": base, **peak, "seconds": s.seconds, "input_bytes": s.input_bytes,
                   "documents": s.documents, "tokens": s.tokens}, f)


def rss_row(corpus: str, model: str, work_dir: str, gb: float, on_disk: bool = False) -> dict:
    import multiprocessing

    size = text_bytes(corpus)
    if on_disk:  # size by the file: one copy of the corpus as parquet, compressed as the big file is
        one = os.path.join(work_dir, "large_1x.parquet")
        size = os.path.getsize(one if os.path.exists(one) else write_parquet(corpus, one, 256))
    repeat = max(1, round(gb * 1e9 / size))
    path = os.path.join(work_dir, f"large_{repeat}x.parquet")
    if not os.path.exists(path):
        t = time.perf_counter()
        write_parquet(corpus, path, 256, repeat)
        print(f"wrote {path} ({os.path.getsize(path) / 1e9:.2f} GB on disk) in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
    result_file = os.path.join(work_dir, "rss.json")
    proc = multiprocessing.get_context("fork").Process(
        target=_rss_run, args=(path, model, os.path.join(work_dir, "out_rss"), result_file))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"the RSS run failed with exit code {proc.exitcode}")
    r = json.load(open(result_file))
    return {"what": "peak memory, 2 workers, parquet", "file_gb": os.path.getsize(path) / 1e9,
            "text_gb": r["input_bytes"] / 1e9, **r}


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the preprocess workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _own_cpu_seconds() -> float:
    """CPU time of this process alone: the reader/writer (and the encoder too with 1 worker)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    return me.ru_utime + me.ru_stime


def encode_rates(model: str, corpus: str) -> dict:
    """MB per CPU second of each encoder alone over the same documents (one thread)."""
    import sentencepiece as spm

    from data_tools.cached_encode import CachedEncoder
    from data_tools.tiktoken_encode import TiktokenEncoder

    texts = [json.loads(line)["text"] for line in open(corpus, encoding="utf-8")]
    nbytes = sum(len(t.encode("utf-8")) for t in texts)
    sp = spm.SentencePieceProcessor(model_file=model)
    encoders = {"sentencepiece.encode": lambda batch: sp.encode(batch, out_type=int, num_threads=1),
                "segment cache, cold": CachedEncoder(model).encode_flat,
                "tiktoken BPE": TiktokenEncoder(model).encode_flat}
    rates = {}
    for name, encode in encoders.items():
        start = time.process_time()
        for i in range(0, len(texts), 100):  # ~1 MB batches, as preprocess's chunks
            encode(texts[i:i + 100])
        rates[name] = nbytes / 1e6 / (time.process_time() - start)
    return rates


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work-dir", default=os.path.join(REPO, "bench", "results", "preprocess_work"))
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--english-repeat", type=int, default=10)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--passes", type=int, default=1,
                   help="preprocess reads the corpus this many times (as that many inputs): longer runs "
                        "amortise worker start-up (~0.7 s each); the tiktoken encoder keeps no state "
                        "between documents, so a repeated document costs what a new one does")
    p.add_argument("--formats", nargs="+", default=["jsonl"], choices=["jsonl", "parquet"],
                   help="input formats to time (parquet: the same documents, see --row-group-docs)")
    p.add_argument("--row-group-docs", type=int, default=64, help="documents per parquet row group")
    p.add_argument("--rounds", type=int, default=1, help="repeat every (format, workers) run this many times, "
                                                         "interleaved, to see the noise of a shared machine")
    p.add_argument("--no-encoders", action="store_true", help="skip timing the encoders alone")
    p.add_argument("--rss-gb", type=float, default=0.0, help="also measure peak memory on a parquet file of "
                                                             "about this many GB of text (0: skip)")
    p.add_argument("--rss-disk-gb", type=float, default=0.0,
                   help="as --rss-gb, but the parquet file is about this many GB on disk (snappy: ~3x more text)")
    p.add_argument("--json-out", default=os.path.join(REPO, "bench", "results", "preprocess_cpu.json"))
    args = p.parse_args()

    os.makedirs(args.work_dir, exist_ok=True)
    corpus = build_corpus(os.path.join(args.work_dir, "corpus.jsonl"), args.english_repeat)
    tok_prefix = os.path.join(args.work_dir, f"bpe{args.vocab_size}")
    if not os.path.exists(tok_prefix + ".model"):
        t = time.perf_counter()
        train_tokenizer(TokenizerConfig(inputs=[corpus], output_prefix=tok_prefix, vocab_size=args.vocab_size,
                                        max_sentences=400_000))
        print(f"trained {tok_prefix}.model in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    model = tok_prefix + ".model"
    size_mb = os.path.getsize(corpus) / 1e6

    rows = [] if args.no_encoders else [
        {"what": f"{name} (encode only)", "workers": 1, "seconds": None, "cpu_seconds": None,
         "mb_per_s": None, "mb_per_s_per_core": None, "mb_per_cpu_s": rate}
        for name, rate in encode_rates(model, corpus).items()]
    from megatron.core.datasets import indexed_dataset  # noqa: F401  (its import is not preprocess CPU time)

    inputs = {"jsonl": corpus}
    if "parquet" in args.formats:
        inputs["parquet"] = write_parquet(corpus, os.path.join(args.work_dir, f"corpus_rg{args.row_group_docs}.parquet"),
                                          args.row_group_docs)
    text_mb = text_bytes(corpus) / 1e6 * args.passes
    for rnd in range(args.rounds):
        for fmt in args.formats:
            for w in args.workers:
                cpu0, own0 = _cpu_seconds(), _own_cpu_seconds()
                s = preprocess(PreprocessConfig(inputs=[inputs[fmt]] * args.passes, tokenizer_model=model, workers=w,
                                                overwrite=True, output_prefix=os.path.join(args.work_dir, f"out_{fmt}_w{w}"),
                                                progress=False))
                cpu, own = _cpu_seconds() - cpu0, _own_cpu_seconds() - own0
                rate = text_mb / s.seconds  # document text per second: the same bytes for both formats
                rows.append({"what": f"data_tools.preprocess {fmt}", "format": fmt, "round": rnd, "workers": w,
                             "seconds": s.seconds, "cpu_seconds": cpu, "mb_per_s": rate, "mb_per_s_per_core": rate / w,
                             "mb_per_cpu_s": text_mb / cpu, "main_cpu_seconds": own, "tokens": s.tokens, "documents": s.documents,
                             "encoder": s.encoder})
    rss = None
    if args.rss_gb > 0 or args.rss_disk_gb > 0:
        on_disk = args.rss_disk_gb > 0
        rss = rss_row(corpus, model, args.work_dir, args.rss_disk_gb if on_disk else args.rss_gb, on_disk)

    print(f"corpus {size_mb:.1f} MB JSONL, {text_mb / args.passes:.1f} MB of document text (preprocess reads it "
          f"{args.passes}x), BPE vocab {args.vocab_size}, {os.cpu_count()} CPUs, load avg {os.getloadavg()[0]:.1f}")
    print("MB = document text (the same bytes in JSONL and parquet); MB/s/core = wall MB/s / workers; "
          "MB/cpu-s = MB per CPU second of reader/writer + workers (the per-core rate on an idle core, "
          "less sensitive to other load)")
    print(f"preprocess encoder: {rows[-1]['encoder']}")
    print(f"{'what':<36}{'workers':>8}{'seconds':>9}{'MB/s':>8}{'MB/s/core':>11}{'MB/cpu-s':>10}")

    def f(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    for r in rows:
        print(f"{r['what']:<36}{r['workers']:>8}{f(r['seconds']):>9}{f(r['mb_per_s']):>8}"
              f"{f(r['mb_per_s_per_core']):>11}{f(r['mb_per_cpu_s']):>10}")
    for r in rows:
        if r.get("workers", 1) > 1 and r.get("main_cpu_seconds") is not None:
            print(f"{r['what']} {r['workers']} workers: the reader/writer used {r['main_cpu_seconds']:.2f} CPU s "
                  f"of {r['cpu_seconds']:.2f} ({100 * r['main_cpu_seconds'] / r['cpu_seconds']:.0f}%)")
    for fmt in args.formats:  # best of the rounds: the least disturbed by other jobs
        best = {w: min(r["seconds"] for r in rows if r.get("format") == fmt and r["workers"] == w) for w in args.workers}
        if 1 in best and 2 in best:
            cpu = {w: min(r["cpu_seconds"] for r in rows if r.get("format") == fmt and r["workers"] == w) for w in (1, 2)}
            # On 2 idle cores a 2-worker run takes at least its CPU time / 2: the load-insensitive estimate.
            print(f"{fmt}: 2 workers / 1 worker = {best[1] / best[2]:.2f}x wall (best of {args.rounds} round(s)); "
                  f"CPU {cpu[1]:.1f} s vs {cpu[2]:.1f} s, so at most {2 * cpu[1] / cpu[2]:.2f}x on 2 idle cores")
    if set(args.formats) == {"jsonl", "parquet"}:
        for w in args.workers:
            cpu = {fmt: min(r["cpu_seconds"] for r in rows if r.get("format") == fmt and r["workers"] == w)
                   for fmt in args.formats}
            print(f"parquet / jsonl CPU seconds with {w} worker(s): {cpu['parquet'] / cpu['jsonl']:.3f} "
                  "(below 1: parquet is cheaper per byte of text)")
    if rss:
        mb = 2**20
        print(f"peak memory, 2 workers, {rss['file_gb']:.2f} GB parquet ({rss['text_gb']:.2f} GB of text, "
              f"{rss['documents']} documents, {rss['seconds']:.0f} s): reader/writer RSS {rss['main_rss'] / mb:.0f} MiB "
              f"(at start {rss['base_rss'] / mb:.0f}), largest worker USS {rss['worker_uss'] / mb:.0f} MiB, "
              f"sum {rss['total'] / mb:.0f} MiB")
    result = {"bench": "preprocess", "corpus_mb": size_mb, "passes": args.passes, "vocab_size": args.vocab_size, "model_type": "bpe",
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "rss": rss}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
