"""Projective 7-number transforms of the KLA step (docs/kla.md#transforms).

One token is the 3×3 map ``M_t = U_t·P_t`` acting on the projective state
``(X, Y, W)`` with ``lam = X/W`` and ``eta = Y/W``. Products keep the pattern
``[[A,0,B],[E,G,F],[C,0,D]]``, so any span of tokens is 7 numbers per lane.
A transform is stored as one tensor ``T`` with a leading axis of size 7 in the
order ``(A, B, C, D, E, F, G)``; the remaining axes are the lanes.

These functions are shared by the PyTorch scan, the Triton chunk combine and
context parallelism. Every compose is followed by an exact power-of-two rescale
(``normalize``): unnormalised products overflow fp32 within a few thousand steps.
"""
from __future__ import annotations

import torch

from ..kla_core import default_state, state_dtype

A, B, C, D, E, F, G = range(7)


def leaf(phi: torch.Tensor, r: torch.Tensor, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The undivided one-token map (never divides by a², which breaks for small a)."""
    phi, r, a, p = torch.broadcast_tensors(phi, r, a, p)
    a2 = a * a
    return torch.stack([1 + p * phi, phi * a2, p, a2, r * p, r * a2, a])


def token_leaves(v_lambda_v, lambda_v, k, a, p) -> torch.Tensor:
    """Leaf maps of every token: v·Λv, Λv ``[B, L, H, P]``, k ``[B, L, H, S]``, a, p ``[H, P, S]``
    → ``[7, B, L, H, P, S]`` (φ = Λv·k², r = v·Λv·k)."""
    k = k[:, :, :, None, :]
    return leaf(lambda_v[..., None] * k * k, v_lambda_v[..., None] * k, a, p)


def identity_like(x: torch.Tensor) -> torch.Tensor:
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    return torch.stack([one, zero, zero, one, zero, zero, one])


def reset(lam0: torch.Tensor, eta0: torch.Tensor) -> torch.Tensor:
    """The map that sends any state to ``(lam0, eta0)`` (a document start)."""
    lam0, eta0 = torch.broadcast_tensors(lam0, eta0)
    zero, one = torch.zeros_like(lam0), torch.ones_like(lam0)
    return torch.stack([zero, lam0, zero, one, zero, eta0, zero])


def normalize(t: torch.Tensor) -> torch.Tensor:
    """Rescale by 2^-exponent(A+D): exact (no rounding) and outside autograd.

    Any positive rescaling leaves the mapped state unchanged, so a detached
    scale keeps gradients exact.
    """
    with torch.no_grad():
        _, exponent = torch.frexp(t[A] + t[D])
        scale = torch.ldexp(torch.ones_like(t[A]), -exponent)
    return t * scale


def compose(t2: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """``t2 · t1`` (t1 earlier in time), normalised."""
    a1, b1, c1, d1, e1, f1, g1 = t1.unbind(0)
    a2, b2, c2, d2, e2, f2, g2 = t2.unbind(0)
    out = torch.stack(
        [
            a2 * a1 + b2 * c1,
            a2 * b1 + b2 * d1,
            c2 * a1 + d2 * c1,
            c2 * b1 + d2 * d1,
            e2 * a1 + g2 * e1 + f2 * c1,
            e2 * b1 + g2 * f1 + f2 * d1,
            g2 * g1,
        ]
    )
    return normalize(out)


def apply(t: torch.Tensor, lam0: torch.Tensor, eta0: torch.Tensor):
    """State after ``t`` starting from ``(lam0, eta0)``: returns ``(lam, eta)``."""
    w = t[C] * lam0 + t[D]
    lam = (t[A] * lam0 + t[B]) / w
    eta = (t[E] * lam0 + t[G] * eta0 + t[F]) / w
    return lam, eta


def inclusive_scan(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Hillis–Steele prefix composition along lane axis ``dim`` (of the lanes, not the 7-axis).

    ``out[i] = t[i] · t[i-1] · … · t[0]`` in log2(n) rounds of :func:`compose`.
    """
    axis = dim + 1 if dim >= 0 else dim
    n = t.shape[axis]
    offset = 1
    while offset < n:
        later = t.narrow(axis, offset, n - offset)
        earlier = t.narrow(axis, 0, n - offset)
        t = torch.cat([t.narrow(axis, 0, offset), compose(later, earlier)], dim=axis)
        offset *= 2
    return t


def exclusive_from_inclusive(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Shift an inclusive scan by one along ``dim`` and put the identity first."""
    axis = dim + 1 if dim >= 0 else dim
    first = identity_like(t.narrow(axis, 0, 1)[0])
    return torch.cat([first, t.narrow(axis, 0, t.shape[axis] - 1)], dim=axis)


def working_inputs(v, lambda_v, k, q, a, p, initial_state, cu_seqlens):
    """The PyTorch scans' inputs in their working precision (fp32; float64 when ``a`` is float64)
    and the initial state, by default λ = 1, η = 0 for each sequence (row, or packed document)."""
    dtype = state_dtype(a)
    v, lambda_v, k, q, a, p = (x.to(dtype) for x in (v, lambda_v, k, q, a, p))
    B, _, H, P = v.shape
    S = k.shape[-1]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is None:
        state = default_state((n_seq, H, P, S), dtype=dtype, device=v.device)
    else:
        state = tuple(s.to(dtype) for s in initial_state)
    return (v, lambda_v, k, q, a, p), state
