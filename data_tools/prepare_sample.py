"""One shot for smoke runs: sample corpus -> small tokenizer -> indexed dataset.

    python -m data_tools.prepare_sample --out data/sample

writes ``DIR/sample.jsonl``, ``DIR/tokenizer.{model,vocab,json}``,
``DIR/sample_text_document.{bin,idx}`` and ``DIR/prepare_sample.json`` (the paths, for
scripts). Takes about a second plus the megatron-core import. Idempotent: when the
manifest says the same settings were already built and the files are there, nothing is
redone (``--force`` rebuilds).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

MANIFEST = "prepare_sample.json"


def _manifest_matches(path: str, settings: dict) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("settings") != settings:
        return None
    files = [manifest["jsonl"], manifest["tokenizer_model"], manifest["data_prefix"] + ".bin",
             manifest["data_prefix"] + ".idx"]
    return manifest if all(os.path.isfile(f) for f in files) else None


def prepare_sample(out_dir: str, vocab_size: int = 1024, force: bool = False, progress: bool = False) -> dict:
    """Build (or reuse) the sample dataset in ``out_dir``; returns the manifest::

        {"jsonl": ..., "tokenizer_model": ..., "data_prefix": ..., "vocab_size": ..., "eod": ...,
         "documents": ..., "tokens": ..., "settings": {...}}

    ``data_prefix`` is what a training config's data path takes.
    """
    from .preprocess import PreprocessConfig, preprocess
    from .sample_corpus import write_sample_corpus
    from .train_tokenizer import TokenizerConfig, train_tokenizer

    out_dir = os.path.abspath(out_dir)
    settings = {"vocab_size": vocab_size, "python": list(sys.version_info[:2]), "version": 1}
    manifest_path = os.path.join(out_dir, MANIFEST)
    if not force:
        found = _manifest_matches(manifest_path, settings)
        if found is not None:
            return found
    os.makedirs(out_dir, exist_ok=True)
    jsonl = write_sample_corpus(os.path.join(out_dir, "sample.jsonl"))
    tok_prefix = os.path.join(out_dir, "tokenizer")
    desc = train_tokenizer(TokenizerConfig(inputs=[jsonl], output_prefix=tok_prefix, vocab_size=vocab_size,
                                           overwrite=True, num_threads=1))
    summary = preprocess(PreprocessConfig(inputs=[jsonl], tokenizer_model=tok_prefix + ".model",
                                          output_prefix=os.path.join(out_dir, "sample"), overwrite=True,
                                          on_error="fail", progress=progress))
    manifest = {
        "jsonl": jsonl,
        "tokenizer_model": tok_prefix + ".model",
        "data_prefix": summary.dataset_prefix,
        "vocab_size": desc["vocab_size"],
        "eod": summary.eod,
        "documents": summary.documents,
        "tokens": summary.tokens,
        "settings": settings,
    }
    tmp = f"{manifest_path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
    os.replace(tmp, manifest_path)  # written last: its presence means everything else is done
    return manifest


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.prepare_sample", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is up to date")
    args = p.parse_args(argv)
    try:
        m = prepare_sample(args.out, vocab_size=args.vocab_size, force=args.force)
    except ValueError as e:
        print(f"prepare_sample: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(m, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
