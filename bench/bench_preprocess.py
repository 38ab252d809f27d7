"""Preprocess throughput: MB/s per core for a 32k-vocabulary BPE tokenizer.

Corpus (no download): the Python standard library's ``.py`` files (code with English
comments and docstrings, one document per file) plus the ``pydoc_data`` documentation
topics repeated ``--english-repeat`` times (English prose). A 32k BPE tokenizer is trained
on it once (cached in ``--work-dir``), then ``data_tools.preprocess`` runs with each
worker count in ``--workers``. The encoders alone are timed on one core for comparison:
sentencepiece, the segment cache (``data_tools/cached_encode.py``, from cold) and tiktoken's
BPE with the model's rank table (``data_tools/tiktoken_encode.py``, what preprocess uses).

    python bench/bench_preprocess.py --workers 1 2 --json-out bench/results/preprocess_cpu.json
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


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the preprocess workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


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

    rows = [{"what": f"{name} (encode only)", "workers": 1, "seconds": None, "cpu_seconds": None,
             "mb_per_s": None, "mb_per_s_per_core": None, "mb_per_cpu_s": rate}
            for name, rate in encode_rates(model, corpus).items()]
    from megatron.core.datasets import indexed_dataset  # noqa: F401  (its import is not preprocess CPU time)

    for w in args.workers:
        cpu0 = _cpu_seconds()
        s = preprocess(PreprocessConfig(inputs=[corpus] * args.passes, tokenizer_model=model, workers=w, overwrite=True,
                                        output_prefix=os.path.join(args.work_dir, f"out_w{w}"), progress=False))
        cpu = _cpu_seconds() - cpu0
        rate = s.input_bytes / 1e6 / s.seconds
        rows.append({"what": "data_tools.preprocess", "workers": w, "seconds": s.seconds, "cpu_seconds": cpu,
                     "mb_per_s": rate, "mb_per_s_per_core": rate / w,
                     "mb_per_cpu_s": s.input_bytes / 1e6 / cpu, "tokens": s.tokens, "documents": s.documents,
                     "encoder": s.encoder})

    print(f"corpus {size_mb:.1f} MB JSONL (preprocess reads it {args.passes}x), BPE vocab {args.vocab_size}, {os.cpu_count()} CPUs, "
          f"load avg {os.getloadavg()[0]:.1f}")
    print("MB/s/core = wall MB/s / workers; MB/cpu-s = MB per CPU second of writer + workers "
          "(the per-core rate on an idle core, less sensitive to other load)")
    print(f"preprocess encoder: {rows[-1]['encoder']}")
    print(f"{'what':<34}{'workers':>8}{'seconds':>9}{'MB/s':>8}{'MB/s/core':>11}{'MB/cpu-s':>10}")

    def f(x, spec=".2f"):
        return "" if x is None else format(x, spec)

    for r in rows:
        print(f"{r['what']:<34}{r['workers']:>8}{f(r['seconds']):>9}{f(r['mb_per_s']):>8}"
              f"{f(r['mb_per_s_per_core']):>11}{f(r['mb_per_cpu_s']):>10}")
    result = {"bench": "preprocess", "corpus_mb": size_mb, "passes": args.passes, "vocab_size": args.vocab_size, "model_type": "bpe",
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
