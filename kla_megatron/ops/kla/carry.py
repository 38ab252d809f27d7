"""Chunk summaries that let a sequence be split across ranks (docs/kla.md#context-parallelism).

Context parallelism cuts a sequence into chunks on different ranks. Two per-lane summaries
of a chunk are enough to make the split exact:

- forward, :func:`chunk_transforms`: the chunk's normalised 7-number projective transform
  from identity (docs/kla.md#transforms). Composing the transforms of the earlier chunks and applying them to
  the initial state gives a chunk's exact starting state ``(lam, eta)``.
- backward, :func:`end_adjoint_maps`: the reverse recurrence is affine in the adjoint pair
  ``c = (dL/dmu, dL/dsigma)`` of the state (covariance coordinates, where both reverse gains
  ``a·iota`` and ``a²·iota²`` are ≤ 1), with a lower-triangular gain. So a chunk maps the
  adjoint at its end to the adjoint at its start by ``c_start = Qᵀ·c_end + o``.

Layouts (one "sequence" = a batch row, or one document of ``cu_seqlens`` with B = 1):

- transform ``T``: ``[7, N, H, P, S]`` in the order ``(A, B, C, D, E, F, G)`` of
  :mod:`.transform`.
- ``Q``: ``[3, N, H, P, S]`` = ``(dmu_end/dmu_start, dmu_end/dsigma_start,
  dsigma_end/dsigma_start)``; ``dsigma_end/dmu_start`` is identically 0.
- ``o``: ``[2, N, H, P, S]`` = ``(dL/dmu_start, dL/dsigma_start)`` when the only cotangents
  are ``grad_y``, ``grad_y_var`` and ``grad_final_state``.

Everything is computed in fp32 (fp64 when ``a`` is fp64), in blocks of ``block_size`` tokens
so that memory stays O(block_size·B·H·P·S). These are the PyTorch versions; Triton versions
must keep the same signatures.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kla_core import state_dtype
from . import transform as tr

State = Tuple[torch.Tensor, torch.Tensor]
MM, MS, SS = range(3)  # Q entries: dmu/dmu, dmu/dsigma, dsigma/dsigma


def _reduce_time(t: torch.Tensor) -> torch.Tensor:
    """Compose ``[7, B, T, ...]`` over T (later · earlier) by a pairwise tree: ``[7, B, ...]``."""
    while t.shape[2] > 1:
        if t.shape[2] % 2:
            pad = tr.identity_like(t[:, :, :1][0])
            t = torch.cat([t, pad], dim=2)
        t = tr.compose(t[:, :, 1::2], t[:, :, 0::2])
    return t[:, :, 0]


def _segments(cu_seqlens: Optional[torch.Tensor], L: int):
    if cu_seqlens is None:
        return None
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != L or any(e <= s for s, e in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must start at 0, increase strictly and end at L={L}, got {bounds}")
    return list(zip(bounds[:-1], bounds[1:]))


def chunk_transforms(
    v_lambda_v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    *,
    cu_seqlens: Optional[torch.Tensor] = None,
    block_size: int = 256,
) -> torch.Tensor:
    """Normalised 7-number transform from identity of each sequence (no reset at its start).

    Args:
        v_lambda_v: ``[B, L, H, P]`` the product v·Λv (the only way v enters the state).
        lambda_v: ``[B, L, H, P]`` value precisions Λv > 0.
        k: ``[B, L, H, S]`` keys.
        a, p: ``[H, P, S]`` decay and process noise.
        cu_seqlens: ``[N + 1]`` document offsets (B must be 1): one transform per document.
            A context-parallel chunk that contains document starts needs only the transform
            of the part after its last start (call this on that slice), composed after the
            reset to that document's initial state (``transform.reset``).
        block_size: tokens reduced at a time (memory bound, not a result parameter).

    Returns:
        ``[7, N, H, P, S]`` (N = B, or the number of documents), fp32 (fp64 for fp64 ``a``).
        ``transform.apply(T, lam0, eta0)`` is the state after the sequence from ``(lam0, eta0)``.
    """
    dtype = state_dtype(a)
    v_lambda_v, lambda_v, k, a, p = (x.to(dtype) for x in (v_lambda_v, lambda_v, k, a, p))
    segments = _segments(cu_seqlens, v_lambda_v.shape[1])
    if segments is not None:
        if v_lambda_v.shape[0] != 1:
            raise ValueError(f"chunk_transforms: with cu_seqlens the batch must be 1, got {v_lambda_v.shape[0]}")
        return torch.cat(
            [
                chunk_transforms(v_lambda_v[:, s:e], lambda_v[:, s:e], k[:, s:e], a, p, block_size=block_size)
                for s, e in segments
            ],
            dim=1,
        )
    total = None
    for s in range(0, v_lambda_v.shape[1], block_size):
        sl = slice(s, s + block_size)
        block = _reduce_time(tr.token_leaves(v_lambda_v[:, sl], lambda_v[:, sl], k[:, sl], a, p))
        total = block if total is None else tr.compose(block, total)
    return total


# ---------------------------------------------------------------------------------------
# Backward: affine adjoint maps. A map is (M, o) with M lower-triangular 2x2 stored as
# (m_mm, m_sm, m_ss) acting on c = (c_mu, c_sigma): f(c) = M·c + o.
# Note M here is Qᵀ: (Qᵀ)[sigma, mu] = dmu_end/dsigma_start, stored in slot MS.
# ---------------------------------------------------------------------------------------


def _affine_compose(first: Tuple[torch.Tensor, torch.Tensor], then: Tuple[torch.Tensor, torch.Tensor]):
    """``first ∘ then`` (apply ``then`` first): for an earlier span ``first`` and a later span
    ``then`` this maps the later span's end adjoint to the earlier span's start adjoint."""
    (m1, o1), (m2, o2) = first, then
    m = torch.stack([m1[MM] * m2[MM], m1[MS] * m2[MM] + m1[SS] * m2[MS], m1[SS] * m2[SS]])
    o = torch.stack([m1[MM] * o2[0] + o1[0], m1[MS] * o2[0] + m1[SS] * o2[1] + o1[1]])
    return m, o


def apply_adjoint_map(q: torch.Tensor, o: torch.Tensor, c_end: torch.Tensor) -> torch.Tensor:
    """``c_start = Qᵀ·c_end + o``; ``q`` ``[3, ...]``, ``o`` and ``c_end`` ``[2, ...]``."""
    return torch.stack([q[MM] * c_end[0] + o[0], q[MS] * c_end[0] + q[SS] * c_end[1] + o[1]])


def compose_adjoint_maps(earlier: Tuple[torch.Tensor, torch.Tensor], later: Tuple[torch.Tensor, torch.Tensor]):
    """(Q, o) of two consecutive spans joined: maps the later span's end adjoint to the
    earlier span's start adjoint. Products of gains ≤ 1: no rescaling needed."""
    return _affine_compose(earlier, later)


def _reduce_affine_time(m: torch.Tensor, o: torch.Tensor):
    """Compose per-token maps ``[3|2, B, T, ...]`` over T (earliest outermost) by a pairwise tree."""
    while m.shape[2] > 1:
        if m.shape[2] % 2:
            m = torch.cat([m, torch.zeros_like(m[:, :, :1])], dim=2)
            m[MM, :, -1] = 1
            m[SS, :, -1] = 1
            o = torch.cat([o, torch.zeros_like(o[:, :, :1])], dim=2)
        m, o = _affine_compose((m[:, :, 0::2], o[:, :, 0::2]), (m[:, :, 1::2], o[:, :, 1::2]))
    return m[:, :, 0], o[:, :, 0]


def info_to_adjoint(d_lam: torch.Tensor, d_eta: torch.Tensor, lam: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """Cotangent of ``(lam, eta)`` -> cotangent ``[2, ...]`` of ``(mu, sigma)`` at that state."""
    mu = eta / lam
    return torch.stack([lam * d_eta, -lam * lam * (d_lam + mu * d_eta)])


def adjoint_to_info(c: torch.Tensor, lam: torch.Tensor, eta: torch.Tensor) -> State:
    """Cotangent ``[2, ...]`` of ``(mu, sigma)`` -> cotangent of ``(lam, eta)`` at that state."""
    sigma = 1.0 / lam
    mu = eta * sigma
    return -sigma * (sigma * c[1] + mu * c[0]), sigma * c[0]


def _block_states(v_lambda_v, lambda_v, k, a, p, lam0, eta0):
    """Posterior states after each token of a block from ``(lam0, eta0)``: ``[B, T, H, P, S]``."""
    t = tr.inclusive_scan(tr.token_leaves(v_lambda_v, lambda_v, k, a, p), dim=1)
    return tr.apply(t, lam0[:, None], eta0[:, None])


def _block_maps(v_lambda_v, lambda_v, k, q, a, p, grad_y, grad_y_var, lam0, eta0, grad_end):
    """This block's affine adjoint map and its end state. ``grad_end`` (``(d_lam, d_eta)``
    or None) is a cotangent on the block's last state."""
    lam, eta = _block_states(v_lambda_v, lambda_v, k, a, p, lam0, eta0)
    lam_prev = torch.cat([lam0[:, None], lam[:, :-1]], dim=1)
    kk = k[:, :, :, None, :]
    phi = lambda_v[..., None] * kk * kk
    r = v_lambda_v[..., None] * kk
    big_p = a * a / lam_prev + p  # predicted variance P_t = a²·sigma_{t-1} + p
    iota = 1.0 / (1.0 + phi * big_p)
    mu = eta / lam
    # Gain from the adjoint of state t to the adjoint of state t-1 (docs/kla.md#backward).
    m = torch.stack([a * iota, a * a * iota * (r - phi * mu), a * a * iota * iota])
    qq = q[:, :, :, None, :]
    local = torch.stack([grad_y[..., None] * qq, grad_y_var[..., None] * qq * qq])
    local = local.expand(2, *m.shape[1:]).clone()
    if grad_end is not None:
        local[:, :, -1] += info_to_adjoint(*grad_end, lam[:, -1], eta[:, -1])
    o = torch.stack([m[MM] * local[0], m[MS] * local[0] + m[SS] * local[1]])
    return _reduce_affine_time(m, o), (lam[:, -1], eta[:, -1])


def end_adjoint_maps(
    v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    grad_y: torch.Tensor,
    grad_y_var: torch.Tensor,
    initial_state: State,
    *,
    grad_final_state: Optional[State] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    block_size: int = 64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Affine map from each sequence's end adjoint to its start adjoint: ``c_start = Qᵀ·c_end + o``.

    ``c`` is the cotangent of the state in covariance coordinates ``(mu, sigma)``; convert with
    :func:`info_to_adjoint` / :func:`adjoint_to_info`. ``Q`` is accumulated as a product of the
    per-token gains (all ≤ 1), never from a transform's determinant.

    Args:
        v, lambda_v: ``[B, L, H, P]``; k, q: ``[B, L, H, S]``; a, p: ``[H, P, S]``.
        grad_y, grad_y_var: ``[B, L, H, P]`` cotangents of the read-outs.
        initial_state: ``(lam, eta)`` ``[N, H, P, S]``, the actual state each sequence starts
            from (the maps depend on the trajectory).
        grad_final_state: optional ``(d_lam, d_eta)`` ``[N, H, P, S]``, a cotangent on each
            sequence's last state that belongs in ``o`` (e.g. a loss on the final state).
        cu_seqlens: ``[N + 1]`` document offsets (B must be 1): one map per document, each
            starting from ``initial_state[n]``.

    Returns:
        ``(Q [3, N, H, P, S], o [2, N, H, P, S])`` in fp32 (fp64 for fp64 ``a``).
    """
    dtype = state_dtype(a)
    v, lambda_v, k, q, a, p, grad_y, grad_y_var = (
        x.to(dtype) for x in (v, lambda_v, k, q, a, p, grad_y, grad_y_var)
    )
    lam0, eta0 = (s.to(dtype) for s in initial_state)
    segments = _segments(cu_seqlens, v.shape[1])
    if segments is not None:
        if v.shape[0] != 1:
            raise ValueError(f"end_adjoint_maps: with cu_seqlens the batch must be 1, got {v.shape[0]}")
        maps = [
            end_adjoint_maps(
                *(x[:, s:e] for x in (v, lambda_v, k, q)), a, p, grad_y[:, s:e], grad_y_var[:, s:e],
                (lam0[n : n + 1], eta0[n : n + 1]),
                grad_final_state=None if grad_final_state is None
                else tuple(g[n : n + 1] for g in grad_final_state),
                block_size=block_size,
            )
            for n, (s, e) in enumerate(segments)
        ]
        return torch.cat([m[0] for m in maps], dim=1), torch.cat([m[1] for m in maps], dim=1)

    v_lambda_v = v * lambda_v
    L = v.shape[1]
    blocks = list(range(0, L, block_size))
    # Blocks run forward in time (each needs its start state); the maps compose with the
    # earliest outermost. The last block also takes the final-state cotangent.
    total, lam, eta = None, lam0, eta0
    for i, s in enumerate(blocks):
        sl = slice(s, s + block_size)
        grad_end = None
        if i == len(blocks) - 1 and grad_final_state is not None:
            grad_end = tuple(g.to(dtype) for g in grad_final_state)
        block_map, (lam, eta) = _block_maps(
            v_lambda_v[:, sl], lambda_v[:, sl], k[:, sl], q[:, sl], a, p,
            grad_y[:, sl], grad_y_var[:, sl], lam, eta, grad_end,
        )
        total = block_map if total is None else _affine_compose(total, block_map)
    return total
