"""Benchmark the KLA scan: Triton vs PyTorch path vs flash-linear-attention's chunk_gla.

Times forward and forward+backward with CUDA events (median of repeats after warm-up,
``triton.testing.do_bench``), bf16 inputs, fp32 state; reports the achieved fraction of
the FP32 roofline of docs/kla.md#costs (0.65 ms forward, 2 ms backward at 2.1e9 lane-steps)
and the peak memory beyond the inputs. Prints a table and writes JSON.

    python bench/bench_scan.py --out bench_scan.json
"""
from __future__ import annotations

import argparse
import json
import platform

import torch

ROOF_FWD_MS_PER_ELEM = 0.65 / (8 * 4096 * 4096 * 16)
ROOF_BWD_MS_PER_ELEM = 2.0 / (8 * 4096 * 4096 * 16)
SHAPES = [  # (B, L, M, S)
    (8, 4096, 4096, 16),
    (4, 2048, 4096, 16),
    (1, 32768, 4096, 16),
    (16, 2048, 2048, 16),
]
HEAD_DIM = 64  # channels per KLA head


def _kla_inputs(B, L, M, S, requires_grad):
    from kla_megatron.ops.kla import discretize

    H, P = M // HEAD_DIM, HEAD_DIM
    dev, bf = "cuda", torch.bfloat16
    k = torch.nn.functional.normalize(torch.randn(B, L, H, S, device=dev), dim=-1).to(bf)
    q = torch.nn.functional.normalize(torch.randn(B, L, H, S, device=dev), dim=-1).to(bf)
    v = torch.randn(B, L, H, P, device=dev, dtype=bf)
    lv = (1 / (torch.nn.functional.softplus(torch.randn(B, L, H, P, device=dev)) + 1e-4)).to(bf)
    a, p = discretize(torch.zeros(H, P, S, device=dev), torch.empty(H, P, S, device=dev).uniform_(-6.9, -2.3),
                      torch.full((H, P, S), 0.01, device=dev))
    xs = [v, lv, k, q, a, p]
    for x in xs:
        x.requires_grad_(requires_grad)
    return xs


def _gla_inputs(B, L, requires_grad):
    # flash-linear-attention's GLA 1.3B shape: 4 heads, K = 256, V = 512.
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, L, 4, 256, device=dev, dtype=bf)
    k = torch.randn(B, L, 4, 256, device=dev, dtype=bf)
    v = torch.randn(B, L, 4, 512, device=dev, dtype=bf)
    g = torch.nn.functional.logsigmoid(torch.randn(B, L, 4, 256, device=dev)).to(bf)
    xs = [q, k, v, g]
    for x in xs:
        x.requires_grad_(requires_grad)
    return xs


def _time(fn, backward):
    from triton.testing import do_bench

    def run():
        outs = fn()
        if backward:
            loss = sum(o.float().sum() for o in outs if o is not None and o.requires_grad)
            loss.backward()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    ms = do_bench(run, warmup=50, rep=300, return_mode="median")
    return ms, peak


def bench_one(name, shape, backward):
    B, L, M, S = shape
    try:
        if name == "gla":
            from fla.ops.gla import chunk_gla

            q, k, v, g = _gla_inputs(B, L, backward)
            fn = lambda: chunk_gla(q, k, v, g)[:1]  # noqa: E731
        else:
            from kla_megatron.ops.kla import kla_scan

            xs = _kla_inputs(B, L, M, S, backward)
            fn = lambda: kla_scan(*xs, backend=name, check_values=False)[:2]  # noqa: E731
        ms, peak = _time(fn, backward)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "note": "OOM"}
    except ImportError as exc:
        return {"ms": None, "note": f"unavailable: {exc}"}
    elems = B * L * M * S
    roof = elems * (ROOF_FWD_MS_PER_ELEM + (ROOF_BWD_MS_PER_ELEM if backward else 0))
    out = {"ms": ms, "peak_extra_GiB": peak / 2**30}
    if name != "gla":
        out["roofline_fraction"] = roof / ms
        out["ns_per_token"] = ms * 1e6 / (B * L)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_scan.json")
    parser.add_argument("--backends", default="triton,torch,gla")
    parser.add_argument("--shapes", default=None, help="semicolon-separated B,L,M,S (default: the four issue shapes)")
    args = parser.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [tuple(map(int, s.split(","))) for s in args.shapes.split(";")]
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version()}
    rows = []
    print(f"{meta}")
    print(f"{'shape':<22} {'backend':<8} {'pass':<8} {'ms':>9} {'roofline':>9} {'ns/token':>9} {'extra GiB':>9}  note")
    for shape in shapes:
        for name in args.backends.split(","):
            # The GLA peer is measured at the comparison shape only (its autotuning is slow).
            if name == "gla" and shape[:2] != (4, 2048):
                continue
            for backward in (False, True):
                res = bench_one(name, shape, backward)
                rows.append({"shape": "B{}·L{}·M{}·S{}".format(*shape), "backend": name,
                             "pass": "fwd+bwd" if backward else "fwd", **res})
                _print_row(rows[-1])
                torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


def _print_row(r):
    ms = f"{r['ms']:.3f}" if r["ms"] is not None else "-"
    roof = f"{r['roofline_fraction']:.2f}" if "roofline_fraction" in r else "-"
    nst = f"{r['ns_per_token']:.1f}" if "ns_per_token" in r else "-"
    mem = f"{r['peak_extra_GiB']:.2f}" if "peak_extra_GiB" in r else "-"
    print(f"{r['shape']:<22} {r['backend']:<8} {r['pass']:<8} {ms:>9} {roof:>9} {nst:>9} {mem:>9}  {r.get('note', '')}",
          flush=True)


if __name__ == "__main__":
    main()
