"""The KLA filter as a plain sequential loop: the definition of truth.

The information-form step of docs/kla.md#filter (``filter_step`` in ``ops/kla_core.py``) one
token at a time, in whatever float dtype the inputs have (float64 in tests). Slow by design;
every other backend is checked against this file.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kla_core import State, default_state, filter_scan


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
        lam0, eta0 = default_state((n_seq, H, P, S), dtype=dtype, device=v.device)
    else:
        lam0, eta0 = (s.to(dtype) for s in initial_state)

    if cu_seqlens is None:
        y, y_var, lam, eta = filter_scan(v, lambda_v, k, q, a, p, lam0, eta0)
    else:
        bounds = [int(b) for b in cu_seqlens]
        pieces = []
        for n, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            seg = [x[:, start:end] for x in (v, lambda_v, k, q)]
            pieces.append(filter_scan(*seg, a, p, lam0[n : n + 1], eta0[n : n + 1]))
        y = torch.cat([pc[0] for pc in pieces], 1)
        y_var = torch.cat([pc[1] for pc in pieces], 1)
        lam = torch.cat([pc[2] for pc in pieces], 0)
        eta = torch.cat([pc[3] for pc in pieces], 0)
    return y, y_var, ((lam, eta) if output_final_state else None)
