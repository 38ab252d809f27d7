"""Parallel KLA scan in plain PyTorch: the fallback wherever no Triton kernel applies.

Runs on any device and is differentiable by autograd. Time is cut into chunks
of ``chunk_size`` tokens; inside a chunk the 7-number transforms are prefix-
composed in log2(chunk_size) rounds, the chunk totals are prefix-composed across
chunks, and each token's state is the chunk-local prefix applied to its chunk's
start state. Each sequence's (or, with ``cu_seqlens``, each document's) first token is
replaced by a *reset* transform to its exact post-token state, so packed documents
need no special path.

Memory is O(7·log2(chunk_size)·B·L·H·P·S) for autograd: this path is for
correctness and portability, the Triton kernels are for speed.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import transform as tr

State = Tuple[torch.Tensor, torch.Tensor]


def _first_step(v, lambda_v, k, a, p, lam0, eta0):
    """State after a sequence's first token, in covariance form (docs/kla.md#sequential-forms).

    The gradient to the initial state flows through this step alone, and the
    covariance form differentiates without cancellation (dP/dσ0 = a²), where the
    information form and the projective transform both subtract nearly equal terms
    once the initial state is forgotten (small a).
    """
    k = k[..., None, :]
    phi = lambda_v[..., None] * k * k
    r = (v * lambda_v)[..., None] * k
    sigma0 = 1 / lam0
    prior = a * a * sigma0 + p
    iota = 1 / (1 + phi * prior)
    sigma = prior * iota
    mu = (a * eta0 * sigma0 + r * prior) * iota
    return 1 / sigma, mu / sigma


def _insert_resets(t, starts, first_states):
    """Replace the first token of every sequence by a reset to its exact post-token state:
    token 0 of every row (``starts is None``) or token ``starts[n]`` of row 0 (varlen)."""
    if starts is None:
        first = tr.reset(*first_states)
        return torch.cat([first[:, :, None], t[:, :, 1:]], dim=2)
    row = t[:, 0]  # [7, L, H, P, S]
    return row.index_copy(1, starts, tr.reset(*first_states))[:, None]


def _prefix_states(t, chunk_size):
    """States after every token, from transforms [7, B, L, H, P, S] that start with a reset."""
    L = t.shape[2]
    n_chunks = -(-L // chunk_size)
    pad = n_chunks * chunk_size - L
    if pad:
        ident = tr.identity_like(t[:, :, :1].expand(-1, -1, pad, -1, -1, -1)[0])
        t = torch.cat([t, ident], dim=2)
    t = t.unflatten(2, (n_chunks, chunk_size))  # [7, B, N, C, H, P, S]
    intra = tr.inclusive_scan(t, dim=2)
    inter = tr.exclusive_from_inclusive(tr.inclusive_scan(intra[:, :, :, -1], dim=1), dim=1)
    # The first token's reset makes the starting state irrelevant: (1, 0) is a placeholder.
    one, zero = torch.ones_like(inter[0]), torch.zeros_like(inter[0])
    lam_start, eta_start = tr.apply(inter, one, zero)
    lam, eta = tr.apply(intra, lam_start[:, :, None], eta_start[:, :, None])
    return lam.flatten(1, 2)[:, :L], eta.flatten(1, 2)[:, :L]


def torch_kla_scan(
    v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
):
    """Same contract as :func:`kla_megatron.ops.kla.kla_scan`; computes in fp32
    (float64 when ``a`` is float64)."""
    io_dtype = v.dtype
    (v, lambda_v, k, q, a, p), (lam0, eta0) = tr.working_inputs(v, lambda_v, k, q, a, p, initial_state, cu_seqlens)
    L = v.shape[1]

    t = tr.token_leaves(v * lambda_v, lambda_v, k, a, p)
    if cu_seqlens is None:
        starts, first_tokens = None, (v[:, 0], lambda_v[:, 0], k[:, 0])
    else:
        starts = cu_seqlens[:-1].long()
        first_tokens = (x[0].index_select(0, starts) for x in (v, lambda_v, k))
    t = _insert_resets(t, starts, _first_step(*first_tokens, a, p, lam0, eta0))
    lam, eta = _prefix_states(t, min(chunk_size, 1 << max(L - 1, 0).bit_length()))

    qe = q[:, :, :, None, :]
    y = (qe * eta / lam).sum(-1)
    y_var = (qe * qe / lam).sum(-1)
    final = None
    if output_final_state:
        if cu_seqlens is None:
            final = (lam[:, -1], eta[:, -1])
        else:
            last = cu_seqlens[1:].long() - 1
            final = (lam[0].index_select(0, last), eta[0].index_select(0, last))
    return y.to(io_dtype), y_var.to(io_dtype), final
