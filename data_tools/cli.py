"""``kla-data``: one entry point for the dataset commands.

    kla-data merge   --input A B ... --output-prefix OUT
    kla-data inspect PREFIX [--tokenizer TOK] [--samples 3] [--json]
    kla-data preprocess ...        (same as kla-preprocess)
    kla-data train-tokenizer ...   (same as kla-train-tokenizer)
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _merge(args) -> int:
    from .merge import merge_datasets

    r = merge_datasets(args.inputs, args.output_prefix, overwrite=args.overwrite)
    print(f"merged {len(r['inputs'])} datasets into {r['output']}: {r['documents']} documents, "
          f"{r['sequences']} sequences, {r['tokens']} tokens ({r['dtype']})")
    return 0


def _inspect(args) -> int:
    from .inspect_dataset import format_info, inspect_dataset

    info = inspect_dataset(args.prefix, args.tokenizer, samples=args.samples, top=args.top, seed=args.seed,
                           max_chars=args.max_chars)
    print(json.dumps(info, indent=2, ensure_ascii=False) if args.json else format_info(info))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kla-data", description="Merge and inspect megatron-core indexed datasets.")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("merge", help="concatenate indexed datasets (same dtype) into one",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    m.add_argument("--input", dest="inputs", nargs="+", required=True,
                   help="dataset prefixes (or .bin/.idx paths, or globs), merged in this order")
    m.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    m.add_argument("--overwrite", action="store_true")
    m.set_defaults(func=_merge)

    i = sub.add_parser("inspect", help="counts, length statistics, token histogram, decoded samples",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    i.add_argument("prefix", help="dataset prefix (or its .bin/.idx path)")
    i.add_argument("--tokenizer", default=None, help="the dataset's tokenizer (any kind kla-preprocess reads), "
                                                     "to decode samples and name pieces")
    i.add_argument("--samples", type=int, default=3, help="documents to decode (needs --tokenizer)")
    i.add_argument("--top", type=int, default=10, help="most frequent token ids to list")
    i.add_argument("--seed", type=int, default=0, help="which documents are sampled")
    i.add_argument("--max-chars", type=int, default=400, help="characters shown per sample")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.set_defaults(func=_inspect)

    sub.add_parser("preprocess", help="same as kla-preprocess", add_help=False)
    sub.add_parser("train-tokenizer", help="same as kla-train-tokenizer", add_help=False)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "preprocess":
        from .preprocess import main as preprocess_main

        return preprocess_main(argv[1:])
    if argv and argv[0] == "train-tokenizer":
        from .train_tokenizer import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"kla-data {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
