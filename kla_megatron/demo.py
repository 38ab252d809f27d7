"""A one-minute CPU tour of the KLA scan: backends agree, packed documents, decoding.

Run with ``kla-scan-demo`` (or ``python -m kla_megatron.demo``).
"""
from __future__ import annotations

import argparse
import time


def _inputs(B, L, H, P, S, dtype, gen):
    import torch

    from kla_megatron.ops.kla_core import discretize, precision_from_log_var

    k = torch.nn.functional.normalize(torch.randn(B, L, H, S, generator=gen), dim=-1)
    q = torch.nn.functional.normalize(torch.randn(B, L, H, S, generator=gen), dim=-1)
    v = torch.randn(B, L, H, P, generator=gen)
    lambda_v = precision_from_log_var(torch.randn(B, L, H, P, generator=gen))
    A_log = torch.zeros(H, P, S)
    delta_raw = torch.empty(H, P, S).uniform_(-6.9, -2.3, generator=gen)
    a, p = discretize(A_log, delta_raw, torch.full((H, P, S), 0.01))
    return [x.to(dtype) for x in (v, lambda_v, k, q)] + [a.to(dtype if dtype == torch.float64 else torch.float32), p.to(a.dtype if dtype != torch.float64 else dtype)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.replace("``", "`"))
    parser.add_argument("--length", type=int, default=512, help="sequence length L of the demo scan (default 512)")
    parser.add_argument("--heads", type=int, default=4, help="number of KLA heads H (default 4)")
    args = parser.parse_args(argv)
    import torch  # after parsing: --help answers without loading torch

    from kla_megatron.ops.kla import kla_decode_step, kla_scan
    from kla_megatron.ops.kla_core import default_state

    gen = torch.Generator().manual_seed(0)
    B, L, H, P, S = 2, args.length, args.heads, 16, 8

    x64 = _inputs(B, L, H, P, S, torch.float64, gen)
    t0 = time.perf_counter()
    ref = kla_scan(*x64, output_final_state=True, backend="naive")
    t_naive = time.perf_counter() - t0
    x32 = [t.float() for t in x64]
    t0 = time.perf_counter()
    out = kla_scan(*x32, output_final_state=True, backend="torch")
    t_torch = time.perf_counter() - t0
    err = ((out[0].double() - ref[0]).norm() / ref[0].norm()).item()
    print(f"scan B={B} L={L} H={H} P={P} S={S}: naive fp64 {t_naive*1e3:.0f} ms, torch fp32 {t_torch*1e3:.0f} ms, "
          f"relative error of y {err:.2e}")

    cu = torch.tensor([0, L // 3, L])
    packed = kla_scan(*[t[:1] for t in x32[:4]], *x32[4:], cu_seqlens=cu, output_final_state=True)
    print(f"packed: 2 documents in one row -> final states {tuple(packed[2][0].shape)}")

    state = default_state((B, H, P, S))
    for t in range(L):
        y_t, _, state = kla_decode_step(*[z[:, t] for z in x32[:4]], *x32[4:], state)
    dec_err = ((y_t - out[0][:, -1]).norm() / out[0][:, -1].norm()).item()
    print(f"decode: {L} one-token steps reproduce the scan's last output to {dec_err:.2e}")
    ok = err < 1e-5 and dec_err < 1e-5
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
