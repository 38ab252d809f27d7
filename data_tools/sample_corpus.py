"""A small English sample corpus for smoke runs and tests, generated, not shipped.

The text is Python's own documentation topics (``pydoc_data.topics``, part of the
standard library on every machine, PSF license): about 80 documents, ~470 KB of English
prose with code examples. Writing is deterministic (topics sorted by name), so the same
Python version always produces the same file. ``repeat`` > 1 writes the topics that many
times (each copy with its own ``id``) for larger test inputs.

    python -m data_tools.sample_corpus --out sample.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, List, Optional, Tuple


def sample_documents() -> List[Tuple[str, str]]:
    """``[(topic_name, text), ...]`` sorted by name, empty topics left out."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # some distributions strip it
        raise RuntimeError("pydoc_data is missing from this Python installation; "
                           "install the full standard library (e.g. Debian's libpython3-stdlib)") from e
    return [(name, topics[name]) for name in sorted(topics) if topics[name].strip()]


def iter_records(repeat: int = 1) -> Iterator[dict]:
    docs = sample_documents()
    for r in range(repeat):
        for name, text in docs:
            yield {"id": name if repeat == 1 else f"{name}#{r}", "text": text}


def write_sample_corpus(path: str, repeat: int = 1) -> str:
    """Write the sample as JSONL (one ``{"id", "text"}`` object per line) to ``path``.

    Written to a temporary name and renamed, so a present file is always complete.
    Returns ``path``.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in iter_records(repeat):
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_tools.sample_corpus", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output .jsonl path")
    p.add_argument("--repeat", type=int, default=1, help="write the topics this many times")
    args = p.parse_args(argv)
    write_sample_corpus(args.out, args.repeat)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
