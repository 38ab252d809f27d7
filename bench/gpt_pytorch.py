"""Transformer anchor on one GPU: a ~1.3B decoder in plain PyTorch (RMSNorm, SDPA causal
attention, SwiGLU MLP), bf16 autocast, fused AdamW. Prints one JSON line with tokens/s, MFU
(6N + causal attention FLOPs over 989 TFLOP/s) and peak memory.

Copied from the anchor the issue-15 baseline was measured with (``gpt_1_3b_pytorch.py``: D 2048,
24 layers, 16 heads, SwiGLU 5632, vocab 32768, B4·L4096, 3 warm-up + 10 timed steps, eager then
torch.compile in one process) and adapted for ``bench/bench_model.py``: one mode per process
(``--mode eager|compile``, so an out-of-memory row does not end the others), sizes and steps from
flags, ``--vocab`` (default 50304, our configs' vocabulary), ``--tie-embeddings`` (the head shares
the embedding, as ``configs/models/gpt_1_3b.yaml`` does), and ``--device cpu`` for the CPU
rehearsal (fp32, no autocast; tiny sizes via ``--hidden/--layers/--heads/--ffn``).

    python bench/gpt_pytorch.py --seq 4096 --batch 4 --mode compile --tie-embeddings
"""
import argparse
import json
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM / H200


class Block(nn.Module):
    def __init__(s, D, NH, HID):
        super().__init__()
        s.D, s.NH = D, NH
        s.n1 = nn.RMSNorm(D); s.n2 = nn.RMSNorm(D)
        s.qkv = nn.Linear(D, 3 * D, bias=False); s.o = nn.Linear(D, D, bias=False)
        s.w12 = nn.Linear(D, 2 * HID, bias=False); s.w3 = nn.Linear(HID, D, bias=False)

    def forward(s, x):
        b, l, _ = x.shape
        D, NH = s.D, s.NH
        q, k, v = s.qkv(s.n1(x)).view(b, l, 3, NH, D // NH).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, l, D)
        x = x + s.o(a)
        g, u = s.w12(s.n2(x)).chunk(2, -1)
        return x + s.w3(F.silu(g) * u)


class GPT(nn.Module):
    def __init__(s, V, D, NL, NH, HID, tie=False):
        super().__init__()
        s.emb = nn.Embedding(V, D); s.blocks = nn.ModuleList(Block(D, NH, HID) for _ in range(NL))
        s.nf = nn.RMSNorm(D); s.head = nn.Linear(D, V, bias=False)
        if tie:
            s.head.weight = s.emb.weight

    def forward(s, t):
        x = s.emb(t)
        for b_ in s.blocks:
            x = b_(x)
        return s.head(s.nf(x))


def peak_memory_gib(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


def run(a):
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    V, D, NL, NH, HID, B, L = a.vocab, a.hidden, a.layers, a.heads, a.ffn, a.batch, a.seq
    torch.manual_seed(0)
    m = GPT(V, D, NL, NH, HID, tie=a.tie_embeddings).to(dev)
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=cuda)
    compiled = a.mode == "compile"
    f = torch.compile(m) if compiled else m
    t = torch.randint(0, V, (B, L + 1), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            logits = f(t[:, :-1])
            loss = F.cross_entropy(logits.float().view(-1, V), t[:, 1:].reshape(-1))
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    tok = B * L / dt
    flops_tok = 6 * n + 6 * NL * L * D  # 6N (all params incl. head) + causal attention (12·L·D·layers / 2)
    row = dict(model="GPT SDPA (plain PyTorch)", mode=a.mode, compiled=compiled, device=str(dev),
               params=n, tied=a.tie_embeddings, V=V, D=D, layers=NL, heads=NH, ffn=HID, B=B, L=L,
               warmup_steps=a.warmup, warmup_s=round(warmup_s, 2), steps=a.steps, step_s=round(dt, 4),
               tokens_per_s=round(tok, 1), mfu=round(tok * flops_tok / PEAK, 4) if cuda else None,
               peak_mem_gib=round(peak_memory_gib(dev), 2))
    print("GPT_PYTORCH_JSON " + json.dumps(row), flush=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("eager", "compile"), default="eager")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=50304, help="the measured baseline used 32768")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--ffn", type=int, default=5632)
    ap.add_argument("--tie-embeddings", action="store_true", help="head shares the embedding weight")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(torch.__version__, name, flush=True)
    run(args)
