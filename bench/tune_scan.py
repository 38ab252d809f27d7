"""Sweep the Triton scan's module-level knobs at one shape; prints a table of kernel times.

    python bench/tune_scan.py --shape 8,4096,4096,16
    python bench/tune_scan.py --shape 1,32768,4096,16 --segments 0,1024,2048,4096

Knobs (attributes of ``kla_megatron.ops.kla.chunk``): ``MAX_CHANNELS`` (channels per
program, one thread each), ``UPCAST_KQ`` (k, q upcast to fp32 before the kernels),
``WARP_REDUCE`` (dk/dq channel sums by warp reduce-scatter), ``BWD_SUBCHUNK`` (two-level
backward replay). ``--segments`` times the whole forward+backward of ``triton_kla_scan`` at
the given time-split segment lengths (0 = auto).
"""
from __future__ import annotations

import argparse
import contextlib

import torch
from triton.testing import do_bench

from kla_megatron.ops.kla import chunk

from bench_scan import _kla_inputs  # noqa: E402  (run from bench/ or with bench on sys.path)

VARIANTS = {
    "default": {},
    "64-channels": {"MAX_CHANNELS": 64},
    "kq-fp32": {"UPCAST_KQ": True},
    "tl.sum-dk": {"WARP_REDUCE": False},
    "subchunk-8": {"BWD_SUBCHUNK": 8},
    "subchunk-4": {"BWD_SUBCHUNK": 4},
}


@contextlib.contextmanager
def _knobs(knobs):
    saved = {k: getattr(chunk, k) for k in knobs}
    for k, v in knobs.items():
        setattr(chunk, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(chunk, k, v)


def _ms(fn, **kw):
    return do_bench(fn, warmup=kw.get("warmup", 10), rep=kw.get("rep", 60), return_mode="median")


def _scan():
    from kla_megatron.ops.kla.triton_scan import triton_kla_scan

    return triton_kla_scan


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8,4096,4096,16")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--segments", default="", help="comma-separated segment lengths (0 = auto)")
    args = parser.parse_args(argv)
    B, L, M, S = map(int, args.shape.split(","))
    v, lv, k, q, a, p = _kla_inputs(B, L, M, S, False)
    gy, gv = torch.randn_like(v), torch.randn_like(v)
    print(f"shape B{B}·L{L}·M{M}·S{S}")
    print(f"{'variant':<14} {'pass':<8} {'ms':>8}")
    for name in filter(None, args.variants.split(",")):
        knobs = VARIANTS[name]
        with _knobs(knobs):
            fwd = lambda: chunk.kla_fwd(v, lv, k, q, a, p, None, None, None, False, True)  # noqa: E731
            print(f"{name:<14} {'fwd':<8} {_ms(fwd):>8.3f}", flush=True)
            _, _, _, ck = fwd()
            bwd = lambda: chunk.kla_bwd(v, lv, k, q, a, p, None, None, None, ck, None, gy, gv,  # noqa: E731
                                        None, None, False)
            print(f"{name:<14} {'bwd':<8} {_ms(bwd):>8.3f}", flush=True)
    scan = _scan()
    xs = [x.requires_grad_() for x in (v, lv, k, q, a, p)]
    for seg in filter(None, args.segments.split(",")):
        seg = int(seg)

        def run():
            y, y_var, _ = scan(*xs, segment_len=seg or None)
            torch.autograd.backward((y, y_var), (gy, gv))

        ms = _ms(run, warmup=5, rep=40)
        print(f"{'segment ' + (str(seg) if seg else 'auto'):<14} {'fwd+bwd':<8} {ms:>8.3f}", flush=True)


if __name__ == "__main__":
    main()
