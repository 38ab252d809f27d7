"""Benchmark the causal depthwise conv (+ SiLU): Triton kernels vs the per-lag PyTorch loops.

Backends: ``triton`` (kla_megatron.ops.conv, custom ops), ``torch`` (the same op's PyTorch
path, fp32 accumulation) and ``loop`` (``KLAMixer.causal_conv``'s loop before the fused op, in
x's dtype, then ``F.silu``). x is the z half of an in_proj output ``[L, B, 2M]`` seen as
``[B, L, M]`` (strided, as in the mixer); the backward computes the gradients of x, weight and
bias for a fixed random dy (``torch.autograd.grad``: nothing accumulates into ``.grad``).

Times forward and forward+backward with CUDA events (median of repeats after warm-up,
``triton.testing.do_bench``) and reports the peak memory beyond the inputs and the time over
the memory floor: one device copy of x (``x.clone()``) for the forward (read x, write y), 1.5
copies more for the backward (read x and dy, write dx).

    python bench/bench_conv.py --out bench_conv.json
    python bench/bench_conv.py --sweep            # Triton block sizes, one line each
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform

import torch
import torch.nn.functional as F

SHAPES = [(2, 4096, 4096, 4), (4, 4096, 4096, 4), (1, 16384, 4096, 4)]  # (B, L, M, K)
VARIANTS = ("plain", "packed")  # packed: position_in_doc with documents of ~1000 tokens


def loop_conv(x, weight, bias, *, window=None, position_in_doc=None, activation=None):
    """The per-lag loop of KLAMixer.causal_conv (pre-fusion), plus the mixer's SiLU."""
    b, s, M = x.shape
    K = weight.shape[-1]
    if window is None:
        window = x.new_zeros(b, M, K - 1)
    padded = torch.cat([window.transpose(1, 2).to(x.dtype), x], dim=1)
    w = weight.to(x.dtype).reshape(M, K)
    y = bias.to(x.dtype).expand(b, s, M)
    for lag in range(K):
        tap = padded[:, K - 1 - lag : K - 1 - lag + s] * w[:, K - 1 - lag]
        if position_in_doc is not None and lag > 0:
            tap = tap * (position_in_doc >= lag).to(x.dtype)[None, :, None]
        y = y + tap
    new_window = padded[:, padded.shape[1] - (K - 1):].transpose(1, 2)
    return (F.silu(y) if activation == "silu" else y), new_window


def _inputs(B, L, M, K, variant, requires_grad):
    """x as the z half of an in_proj output [L, B, 2M] (a strided view, itself the leaf so
    that its gradient is dx, not autograd's copy into the full output), weight, bias, positions."""
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(L, B, 2 * M, device=dev, dtype=bf).transpose(0, 1)[..., :M]
    weight = (torch.randn(M, 1, K, device=dev) / K**0.5).to(bf)
    bias = torch.randn(M, device=dev, dtype=bf)
    leaves = [t.requires_grad_(requires_grad) for t in (x, weight, bias)]
    pos = torch.arange(L, device=dev) % 1000 if variant == "packed" else None
    return leaves, pos


def _time(fn, leaves, backward):
    from triton.testing import do_bench

    dy = None

    def run():
        nonlocal dy
        y, _ = fn()
        if backward:
            dy = torch.randn_like(y) if dy is None else dy
            torch.autograd.grad(y, leaves, dy)

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    return do_bench(run, warmup=25, rep=200, return_mode="median"), peak


def _copy_ms(B, L, M):
    from triton.testing import do_bench

    x = torch.randn(B, L, M, device="cuda", dtype=torch.bfloat16)
    return do_bench(lambda: x.clone(), warmup=25, rep=200, return_mode="median")


def bench_one(backend, shape, variant, backward, floor_ms):
    from kla_megatron.ops.conv import causal_conv1d

    B, L, M, K = shape
    leaves, pos = _inputs(B, L, M, K, variant, backward)
    conv = loop_conv if backend == "loop" else lambda *a, **kw: causal_conv1d(*a, backend=backend, **kw)

    def fn():
        return conv(*leaves, position_in_doc=pos, activation="silu")

    try:
        ms, peak = _time(fn, leaves, backward)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "note": "OOM"}
    floor = floor_ms * (2.5 if backward else 1.0)
    return {"ms": ms, "peak_extra_GiB": peak / 2**30, "floor_ms": floor, "x_floor": ms / floor,
            "ns_per_token": ms * 1e6 / (B * L)}


def sweep(shape, variant):
    """Block sizes of the Triton kernels (the module attributes of
    kla_megatron.ops.conv.triton_conv), forward first, then backward with the best forward;
    one line each, not saved."""
    from kla_megatron.ops.conv import triton_conv as tc

    floor = _copy_ms(*shape[:3])
    print(f"copy floor {floor:.3f} ms; shape {shape} {variant}")
    grid = list(itertools.product((256, 512), (32, 64, 128), (2, 4, 8), (1, 2)))  # BM, TS, ROWS, warps
    best = (float("inf"), None)
    for cfg in grid:
        tc.FWD_BM, tc.FWD_TS, tc.FWD_ROWS, tc.FWD_WARPS = cfg
        ms = bench_one("triton", shape, variant, False, floor)["ms"]
        best = min(best, (ms, cfg))
        print(f"fwd     BM={cfg[0]:<4} TS={cfg[1]:<4} ROWS={cfg[2]} warps={cfg[3]}  {ms:.3f} ms", flush=True)
    tc.FWD_BM, tc.FWD_TS, tc.FWD_ROWS, tc.FWD_WARPS = best[1]
    print(f"best fwd {best}")
    for cfg in grid:
        tc.BWD_BM, tc.BWD_TS, tc.BWD_ROWS, tc.BWD_WARPS = cfg
        ms = bench_one("triton", shape, variant, True, floor)["ms"]
        print(f"fwd+bwd BM={cfg[0]:<4} TS={cfg[1]:<4} ROWS={cfg[2]} warps={cfg[3]}  {ms:.3f} ms", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_conv.json")
    parser.add_argument("--backends", default="triton,torch,loop")
    parser.add_argument("--shapes", default=None, help="semicolon-separated B,L,M,K (default: SHAPES)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--sweep", action="store_true", help="sweep Triton tile sizes at the first shape")
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split(","))) for s in args.shapes.split(";")]
    if args.sweep:
        return sweep(shapes[0], args.variants.split(",")[0])
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    rows = []
    print(meta)
    print(f"{'shape':<20} {'variant':<7} {'backend':<7} {'pass':<8} {'ms':>8} {'floor ms':>8} {'x floor':>8} "
          f"{'ns/token':>8} {'extra GiB':>9}  note")
    for shape in shapes:
        floor = _copy_ms(*shape[:3])
        for variant in args.variants.split(","):
            for name in args.backends.split(","):
                for backward in (False, True):
                    res = bench_one(name, shape, variant, backward, floor)
                    rows.append({"shape": "B{}·L{}·M{}·K{}".format(*shape), "variant": variant, "backend": name,
                                 "pass": "fwd+bwd" if backward else "fwd", **res})
                    _print_row(rows[-1])
                    torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _print_row(r):
    def fmt(key, spec):
        return format(r[key], spec) if r.get(key) is not None else "-"

    print(f"{r['shape']:<20} {r['variant']:<7} {r['backend']:<7} {r['pass']:<8} {fmt('ms', '.3f'):>8} "
          f"{fmt('floor_ms', '.3f'):>8} {fmt('x_floor', '.2f'):>8} {fmt('ns_per_token', '.1f'):>8} "
          f"{fmt('peak_extra_GiB', '.2f'):>9}  {r.get('note', '')}", flush=True)


if __name__ == "__main__":
    main()
