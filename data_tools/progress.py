"""Progress of a preprocess run on stderr: input bytes (of the files on disk, so compressed
inputs have a total too), documents, tokens, rate and ETA.

On a terminal it is a tqdm bar; otherwise (Slurm logs, pipes) one plain line every
``interval`` seconds and a last one at the end, so logs stay readable:

    preprocess: 1.20/2.00 GB (60%), 412,345 docs, 301.2M tokens, 12.4 MB/s, 3,710 docs/s, ETA 1m05s
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Counts bytes, documents and tokens; shows them as a bar or as log lines."""

    def __init__(self, total_bytes: Optional[int], stream: TextIO = None, interval: float = 30.0):
        self.stream = stream or sys.stderr
        self.total = total_bytes
        self.interval = interval
        self.bytes = self.docs = self.tokens = 0
        self.start = self.last = time.perf_counter()
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="preprocess",
                            file=self.stream, mininterval=1.0, dynamic_ncols=True)

    def update(self, nbytes: int, docs: int, tokens: int) -> None:
        self.bytes += nbytes
        self.docs += docs
        self.tokens += tokens
        now = time.perf_counter()
        if self.bar is not None:
            self.bar.update(nbytes)
            rate = self.docs / max(now - self.start, 1e-9)
            self.bar.set_postfix_str(f"docs={self.docs:,} tokens={_count(self.tokens)} {rate:,.0f} docs/s", refresh=False)
        elif now - self.last >= self.interval:
            self.last = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = self.bytes / elapsed
        unit, scale = ("GB", 1e9) if max(self.total or 0, self.bytes) >= 1e9 else ("MB", 1e6)
        if self.total:
            done = f"{self.bytes / scale:.2f}/{self.total / scale:.2f} {unit} ({100 * self.bytes / self.total:.0f}%)"
            eta = _duration((self.total - self.bytes) / rate) if rate > 0 else "?"
        else:
            done, eta = f"{self.bytes / scale:.2f} {unit}", "? (total unknown)"
        return (f"preprocess: {done}, {self.docs:,} docs, {_count(self.tokens)} tokens, {rate / 1e6:.1f} MB/s, "
                f"{self.docs / elapsed:,.0f} docs/s, ETA {eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.bytes or self.docs:  # nothing read (every shard already finished): no line
            print(self.line(), file=self.stream, flush=True)
