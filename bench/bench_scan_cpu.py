"""Benchmark the KLA scan backends on the CPU: naive loop, blocked recurrent, parallel torch.

Forward under ``torch.no_grad`` (inference / prefill) and forward+backward (training), fp32
inputs and state, the head layout of bench_scan.py (64 channels per head). Wall time is the
median of ``--repeats`` runs after one warm-up. Also reports which backend ``auto`` resolves
to here. Prints a table and writes JSON.

    python bench/bench_scan_cpu.py --out bench_scan_cpu.json
    python bench/bench_scan_cpu.py --quick          # small shapes only
    python bench/bench_scan_cpu.py --prefill        # + HF-model prefill: KLA (K- x8, d512) vs Llama
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

SHAPES = [  # (B, L, M, S): the two cases, a decode step, a mid-size prefill
    (1, 2048, 1024, 16),
    (2, 512, 256, 16),
    (1, 1, 1024, 16),
    (4, 1, 1024, 16),
    (1, 512, 1024, 16),
    (8, 256, 512, 16),
]
QUICK = [(2, 512, 256, 16), (1, 1, 1024, 16), (1, 256, 1024, 16)]
HEAD_DIM = 64
BACKENDS = ("naive", "recurrent", "torch")


def _inputs(B, L, M, S, requires_grad, seed=0):
    from kla_megatron.ops.kla import discretize

    torch.manual_seed(seed)
    H, P = max(M // HEAD_DIM, 1), min(M, HEAD_DIM)
    k = torch.nn.functional.normalize(torch.randn(B, L, H, S), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(B, L, H, S), dim=-1)
    v = torch.randn(B, L, H, P)
    lv = 1 / (torch.nn.functional.softplus(torch.randn(B, L, H, P)) + 1e-4)
    a, p = discretize(torch.zeros(H, P, S), torch.empty(H, P, S).uniform_(-6.9, -2.3), torch.full((H, P, S), 0.01))
    xs = [v, lv, k, q, a, p]
    for x in xs:
        x.requires_grad_(requires_grad)
    return xs


def _run(backend, xs, backward):
    from kla_megatron.ops.kla import kla_scan

    if backward:
        y, y_var, _ = kla_scan(*xs, backend=backend, check_values=False)
        (y.sum() + y_var.sum()).backward()
    else:
        with torch.no_grad():
            kla_scan(*xs, backend=backend, check_values=False)


def _time(backend, shape, backward, repeats, budget_s):
    xs = _inputs(*shape, requires_grad=backward)
    t0 = time.perf_counter()
    _run(backend, xs, backward)  # warm-up
    first = time.perf_counter() - t0
    times = [first]
    if first * repeats < budget_s:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            _run(backend, xs, backward)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), len(times)


def _prefill(L, backends, repeats, budget_s):
    """Seconds to read an L-token prompt (no grad, one forward, logits of the last token):
    the exported HF KLA model (d 512, 8 layers ``K-K-K-K-``, M 1024 in 16 heads, S 16, GPT-2
    vocabulary) per scan backend, and a LlamaForCausalLM of the same width and depth."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kla_megatron.hf import KLAConfig, KLAForCausalLM

    vocab, d, n = 50257, 512, 8
    ids = torch.randint(0, vocab, (1, L), generator=torch.Generator().manual_seed(0))
    out = {}
    torch.manual_seed(0)
    kla = KLAForCausalLM(KLAConfig(vocab_size=vocab, hidden_size=d, num_layers=n, kla_heads=16, d_state=16,
                                   num_attention_heads=8, position_embedding="rope", max_seq_len=L)).eval()
    out["kla_params"] = sum(p.numel() for p in kla.parameters())
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n, num_attention_heads=8,
                                         intermediate_size=kla.config.ffn_hidden_size,
                                         max_position_embeddings=L)).eval()
    out["llama_params"] = sum(p.numel() for p in llama.parameters())

    def timed(fn):
        with torch.no_grad():
            t0 = time.perf_counter()
            fn()
            first = time.perf_counter() - t0
            if first * repeats > budget_s:
                return first  # too slow to repeat: the single (cold) run
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    for b in backends:
        kla.config.scan_backend = b
        for layer in kla.model.layers:
            if hasattr(layer, "mixer") and hasattr(layer.mixer, "backend"):
                layer.mixer.backend = b
        out[f"kla_{b}"] = timed(lambda: kla(ids))
    out["llama"] = timed(lambda: llama(ids))
    return out


def main(argv=None):
    from kla_megatron.ops.kla.scan import _resolve_backend

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_scan_cpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=20.0,
                    help="skip repeats (report the single warm-up run) when one run x repeats exceeds this")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--max-parallel-bwd-elems", type=float, default=2 ** 25,
                    help="skip the parallel ('torch') scan's forward+backward above this B*L*M*S "
                         "(its autograd memory is ~42x the state tensor: 5.6 GB at B1 L2048 M1024 S16)")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--shapes", default=None, help="BxLxMxS,... instead of the default list")
    ap.add_argument("--prefill", action="store_true", help="also time the HF models' prompt prefill")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--prefill-backends", default="auto,torch")
    args = ap.parse_args(argv)
    auto = _resolve_backend("auto", torch.device("cpu"))
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine(),
                platform=platform.platform(), auto_resolves_to=auto)
    print(f"# torch {meta['torch']}, {meta['threads']} threads, {meta['platform']}; auto -> {auto!r}")
    print(f"{'B':>3} {'L':>5} {'M':>5} {'S':>3} {'mode':>8} " + " ".join(f"{b:>10}" for b in args.backends.split(","))
          + "   (seconds; median)")
    rows = []
    shapes = QUICK if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(n) for n in sh.split("x")) for sh in args.shapes.split(",")]
    for shape in [] if args.prefill_only else shapes:
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            row = dict(B=shape[0], L=shape[1], M=shape[2], S=shape[3], mode=mode)
            cells = []
            for b in args.backends.split(","):
                if b == "torch" and backward and shape[0] * shape[1] * shape[2] * shape[3] > args.max_parallel_bwd_elems:
                    row[b] = None
                    cells.append(f"{'skipped':>10}")
                    continue
                t, n = _time(b, shape, backward, args.repeats, args.budget_s)
                row[b] = t
                row[f"{b}_runs"] = n
                cells.append(f"{t:>10.4f}")
            rows.append(row)
            print(f"{shape[0]:>3} {shape[1]:>5} {shape[2]:>5} {shape[3]:>3} {mode:>8} " + " ".join(cells), flush=True)
    prefill = None
    if args.prefill or args.prefill_only:
        prefill = _prefill(args.prefill_len, args.prefill_backends.split(","), args.repeats, args.budget_s)
        prefill["L"] = args.prefill_len
        print(f"# prefill of {args.prefill_len} tokens (seconds; median of {args.repeats}): "
              f"KLA {prefill['kla_params'] / 1e6:.1f}M params, Llama {prefill['llama_params'] / 1e6:.1f}M")
        for key, val in prefill.items():
            if key.startswith("kla_") and key != "kla_params" or key == "llama":
                print(f"  {key:>14} {val:8.3f}")
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows, prefill=prefill), f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
