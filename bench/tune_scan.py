"""Sweep the Triton scan's lanes-per-program and warps at one shape; prints a table.

    python bench/tune_scan.py --shape 8,4096,4096,16
"""
from __future__ import annotations

import argparse
import torch
from triton.testing import do_bench

from kla_megatron.ops.kla import chunk

from bench_scan import _kla_inputs  # noqa: E402  (run from bench/ or with bench on sys.path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="8,4096,4096,16")
    args = parser.parse_args(argv)
    B, L, M, S = map(int, args.shape.split(","))
    v, lv, k, q, a, p = _kla_inputs(B, L, M, S, True)
    gy, gv = torch.randn_like(v), torch.randn_like(v)
    print(f"{'pass':<5} {'lanes':>6} {'warps':>6} {'ms':>8}")
    for lanes, warps in ((128, 4), (256, 4), (512, 4), (512, 8)):
        chunk.FWD_LANES, chunk.FWD_WARPS = lanes, warps
        fwd = lambda: chunk.kla_fwd(v, lv, k, q, a, p, None, None, None, False, True)  # noqa: E731
        print(f"{'fwd':<5} {lanes:>6} {warps:>6} {do_bench(fwd, warmup=25, rep=100, return_mode='median'):>8.3f}", flush=True)
    chunk.FWD_LANES, chunk.FWD_WARPS = 256, 4
    _, _, _, ck = chunk.kla_fwd(v, lv, k, q, a, p, None, None, None, False, True)
    for lanes, warps in ((64, 2), (128, 2), (128, 4), (256, 4)):
        chunk.BWD_LANES, chunk.BWD_WARPS = lanes, warps
        bwd = lambda: chunk.kla_bwd(v, lv, k, q, a, p, None, None, None, ck, None, gy, gv, None, None, False)  # noqa: E731
        print(f"{'bwd':<5} {lanes:>6} {warps:>6} {do_bench(bwd, warmup=25, rep=100, return_mode='median'):>8.3f}", flush=True)


if __name__ == "__main__":
    main()
