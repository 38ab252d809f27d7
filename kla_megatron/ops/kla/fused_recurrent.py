"""One-token KLA step for decoding: O(1) work and memory per token.

``kla_decode_step`` dispatches to the Triton decode kernel on CUDA when it is
available and to this PyTorch step otherwise; both share one signature.
"""
from __future__ import annotations

import torch


def torch_kla_step(v, lambda_v, k, q, a, p, lam, eta):
    """Information-form step (kla_math.md §1). v, lambda_v [B, H, P]; k, q [B, H, S];
    a, p [H, P, S]; lam, eta [B, H, P, S]. Returns y, y_var [B, H, P] and the new state."""
    dtype = lam.dtype
    v, lambda_v, k, q, a, p = (x.to(dtype) for x in (v, lambda_v, k, q, a, p))
    k = k[:, :, None, :]
    d = a * a + p * lam
    lam = lam / d + lambda_v[..., None] * k * k
    eta = (a / d) * eta + (v * lambda_v)[..., None] * k
    qe = q[:, :, None, :]
    y = (qe * eta / lam).sum(-1)
    y_var = (qe * qe / lam).sum(-1)
    return y, y_var, lam, eta
