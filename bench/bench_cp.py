"""Context-parallel KLA layer benchmark: forward+backward time and bytes exchanged per layer
for CP = 1, 2, 4 (docs/kla.md#context-parallelism).

- weak scaling: fixed tokens per GPU (default 8k, 16k, 32k), global length = tokens × CP;
- strong scaling: fixed global length (default 64k), tokens per GPU = 64k / CP.

Overhead = per-token layer time at CP over the per-token time at CP = 1 in the same row group
(weak: the same tokens per GPU; strong: CP = 1 on the whole sequence). Communication is the
time inside the CP collectives (synchronised, so it is an upper bound) and the bytes each rank
sends per layer forward+backward (ring algorithms: all-gather (CP−1)·payload, all-reduce
2·(CP−1)/CP·size).

GPU (NCCL, one process per GPU):   python bench/bench_cp.py --cp 1 2 4 --json-out cp.json
CPU smoke (gloo ranks, tiny sizes): python bench/bench_cp.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kla_megatron.parallel.local_ranks import free_port

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce")


class CommMeter:
    """Wraps the torch.distributed collectives the CP helpers use: counts bytes sent per rank
    and the (synchronised) time spent inside them."""

    def __init__(self, cuda: bool):
        self.cuda, self.bytes, self.seconds, self.calls = cuda, 0, 0.0, 0
        self._orig = {}

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def install(self):
        for name in COLLECTIVES:
            orig = getattr(dist, name)
            self._orig[name] = orig

            def wrapped(*args, _orig=orig, _name=name, **kwargs):
                group = kwargs.get("group")
                world = dist.get_world_size(group)
                tensor = args[1] if _name != "all_reduce" else args[0]
                size = tensor.numel() * tensor.element_size()
                self.bytes += (world - 1) * size if _name != "all_reduce" else 2 * (world - 1) * size // world
                self.calls += 1
                self._sync()
                t0 = time.perf_counter()
                out = _orig(*args, **kwargs)
                self._sync()
                self.seconds += time.perf_counter() - t0
                return out

            setattr(dist, name, wrapped)

    def reset(self):
        self.bytes, self.seconds, self.calls = 0, 0.0, 0


def _build_layer(args, cp, device):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kla_megatron.models import KLAModelConfig, KLARuntimeConfig, build_kla_model

    if device.type == "cpu":
        from kla_megatron.compat import enable_cpu_megatron

        enable_cpu_megatron()
    parallel_state.initialize_model_parallel(context_parallel_size=cp)
    model_parallel_cuda_manual_seed(0)
    cfg = KLAModelConfig.from_dict(dict(
        vocab_size=256, hidden_size=args.hidden, num_layers=1, layer_pattern="K", kla_heads=args.heads,
        d_state=args.d_state, preset=args.preset, max_seq_len=args.max_len,
    ))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tc = cfg.to_transformer_config(context_parallel_size=cp, params_dtype=dtype, bf16=device.type == "cuda")
    model = build_kla_model(cfg, tc, runtime=KLARuntimeConfig(scan_backend=args.backend)).to(device)
    return model.decoder.layers[0], dtype


def _time_layer(layer, tokens, batch, hidden, dtype, device, meter, warmup, iters):
    x = torch.randn(tokens, batch, hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, batch, hidden, device=device, dtype=dtype)
    cuda = device.type == "cuda"

    def step():
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    for _ in range(warmup):
        step()
    meter.reset()
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - t0) / iters
    # Slowest rank defines the layer time.
    stats = torch.tensor([elapsed, meter.seconds / iters, meter.bytes / iters], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return stats.tolist()


def _rank_main(rank, cp, port, args, cases, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cp),
                      LOCAL_RANK=str(rank))
    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=cp)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    meter = CommMeter(cuda)
    meter.install()
    layer, dtype = _build_layer(args, cp, device)
    rows = []
    for mode, tokens_per_gpu in cases:
        t, comm, nbytes = _time_layer(layer, tokens_per_gpu, args.batch, args.hidden, dtype, device, meter,
                                      args.warmup, args.iters)
        rows.append(dict(mode=mode, cp=cp, tokens_per_gpu=tokens_per_gpu, global_tokens=tokens_per_gpu * cp,
                         batch=args.batch, layer_ms=1e3 * t, comm_ms=1e3 * comm, bytes_per_rank=int(nbytes)))
    if rank == 0:
        torch.save(rows, out_path)
    dist.destroy_process_group()


def _cases(args, cp):
    cases = [("weak", t) for t in args.weak_tokens]
    if args.strong_total % (2 * cp) == 0:
        cases.append(("strong", args.strong_total // cp))
    return cases


def _overheads(rows):
    base = {}
    for r in rows:
        if r["cp"] == 1:
            key = (r["mode"], r["tokens_per_gpu"] if r["mode"] == "weak" else None)
            base[key] = r["layer_ms"] / r["tokens_per_gpu"]
    for r in rows:
        key = (r["mode"], r["tokens_per_gpu"] if r["mode"] == "weak" else None)
        per_token = r["layer_ms"] / r["tokens_per_gpu"]
        r["us_per_token"] = 1e3 * per_token
        r["overhead"] = per_token / base[key] if key in base else None
        r["comm_fraction"] = r["comm_ms"] / r["layer_ms"]
    return rows


def _table(rows):
    head = f"{'mode':7}{'CP':>3}{'tok/GPU':>9}{'global':>9}{'layer ms':>11}{'us/tok':>9}{'overhead':>10}{'comm ms':>9}{'comm %':>8}{'KiB/rank':>10}"
    lines = [head]
    for r in rows:
        ov = "" if r["overhead"] is None else f"{r['overhead']:.2f}x"
        lines.append(
            f"{r['mode']:7}{r['cp']:>3}{r['tokens_per_gpu']:>9}{r['global_tokens']:>9}{r['layer_ms']:>11.2f}"
            f"{r['us_per_token']:>9.2f}{ov:>10}{r['comm_ms']:>9.2f}{100 * r['comm_fraction']:>7.1f}%"
            f"{r['bytes_per_rank'] / 1024:>10.1f}"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--weak-tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--strong-total", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--preset", default="plain")
    ap.add_argument("--backend", default="auto", help="kla_scan backend of the local scans")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="gloo ranks on CPU at tiny sizes (checks the benchmark end to end)")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.weak_tokens, args.strong_total = [64, 128], 256
        args.hidden, args.heads, args.d_state, args.backend = 32, 2, 4, "torch"
        args.warmup, args.iters = 1, 2
    args.max_len = max(max(args.weak_tokens) * max(args.cp), args.strong_total)
    if not args.cpu_smoke:
        if not torch.cuda.is_available():
            sys.exit("bench_cp: no CUDA device; use --cpu-smoke for the CPU check")
        if max(args.cp) > torch.cuda.device_count():
            sys.exit(f"bench_cp: --cp {max(args.cp)} needs that many GPUs, found {torch.cuda.device_count()}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in args.cp:
            out_path = os.path.join(tmp, f"cp{cp}.pt")
            mp.spawn(_rank_main, args=(cp, free_port(), args, _cases(args, cp), out_path), nprocs=cp, join=True)
            rows += torch.load(out_path)
    rows = _overheads(rows)
    device = "cpu (gloo)" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"KLA layer forward+backward under context parallelism | {device} | hidden {args.hidden}, "
          f"heads {args.heads}, d_state {args.d_state}, batch {args.batch}, backend {args.backend}")
    print(_table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(dict(device=device, args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
