"""The KLA filter as a plain sequential loop: the definition of truth.

Information form exactly as docs/kla.md#filter, in whatever float dtype the inputs
have (float64 in tests). Slow by design; every other backend is checked against
this file.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

State = Tuple[torch.Tensor, torch.Tensor]


def _run_segment(v, lambda_v, k, q, a, p, lam, eta):
    """Walk one sequence. v, lambda_v [B, T, H, P]; k, q [B, T, H, S]; lam, eta [B, H, P, S]."""
    ys, yvars = [], []
    for t in range(v.shape[1]):
        phi = lambda_v[:, t, :, :, None] * k[:, t, :, None, :] ** 2
        r = (v[:, t] * lambda_v[:, t])[..., None] * k[:, t, :, None, :]
        d = a * a + p * lam
        lam = lam / d + phi
        eta = (a / d) * eta + r
        mu, sigma = eta / lam, 1.0 / lam
        qt = q[:, t, :, None, :]
        ys.append((qt * mu).sum(-1))
        yvars.append((qt * qt * sigma).sum(-1))
    return torch.stack(ys, 1), torch.stack(yvars, 1), lam, eta


def naive_kla_scan(
    v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """Reference scan; same contract as :func:`kla_megatron.ops.kla.kla_scan`.

    Computes in the dtype of ``v`` (upcasting nothing); returns y and y_var in
    that dtype and the final state ``(lam, eta)`` or ``None``.
    """
    dtype = v.dtype
    a, p = a.to(dtype), p.to(dtype)
    B, L, H, P = v.shape
    S = k.shape[-1]
    n_seq = B if cu_seqlens is None else len(cu_seqlens) - 1
    if initial_state is None:
        lam0 = v.new_ones(n_seq, H, P, S)
        eta0 = v.new_zeros(n_seq, H, P, S)
    else:
        lam0, eta0 = (s.to(dtype) for s in initial_state)

    if cu_seqlens is None:
        y, y_var, lam, eta = _run_segment(v, lambda_v, k, q, a, p, lam0, eta0)
    else:
        bounds = [int(b) for b in cu_seqlens]
        pieces = []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = [x[:, start:end] for x in (v, lambda_v, k, q)]
            pieces.append(_run_segment(*seg, a, p, lam0[n : n + 1], eta0[n : n + 1]))
        y = torch.cat([pc[0] for pc in pieces], 1)
        y_var = torch.cat([pc[1] for pc in pieces], 1)
        lam = torch.cat([pc[2] for pc in pieces], 0)
        eta = torch.cat([pc[3] for pc in pieces], 0)
    return y, y_var, ((lam, eta) if output_final_state else None)
