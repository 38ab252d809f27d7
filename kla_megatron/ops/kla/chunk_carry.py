"""Triton versions of the chunk summaries in :mod:`.carry` (same signatures, same layouts).

- :func:`triton_chunk_transforms`: one sequential pass per lane composing the undivided
  leaf maps of docs/kla.md#transforms (T ← M_t·T), rescaled by 1/(A+D) every 8 tokens; reads v·Λv, Λv and k
  only. ``[7, N, H, P, S]``.
- :func:`triton_end_adjoint_maps` / :func:`triton_forward_adjoint_maps`: the adjoint maps
  composed in forward order in one sweep (no replay, no parked states): the gain products Q
  and the start adjoint o. ``(Q [3, N, H, P, S], o [2, N, H, P, S])``.

Used by the time-split scan (:mod:`.chunk_split`) and by context parallelism.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import block_sizes
from .triton_common import (channel_lanes, from_kernel, is_gpu_compiled, load_dynamics, load_token, observation,
                            prepare_rows, seq_bounds, state_offsets, to_kernel, update_step)

RESCALE_EVERY = 8


@triton.jit
def _kla_transform_kernel(
    vlv, lambda_v, k, a, p, out, cu_seqlens, T,
    H: tl.constexpr, P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
    RESCALE_EVERY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_p, o_s, m_p, m_s, m_sp = channel_lanes(i_p, P, S, BP, BS)
    b_a, b_a2, b_noise = load_dynamics(a, p, i_h, o_p, o_s, m_sp, H, P, S)
    one = tl.full([BS, BP], 1.0, tl.float32)
    zero = tl.zeros([BS, BP], tl.float32)
    b_A, b_B, b_C, b_D, b_E, b_F, b_G = one, zero, zero, one, zero, zero, one
    # v·Λv arrives as one product and travels in load_token's v slot; its q slot is unused.
    n_vlv, n_lv, n_k, _ = load_token(vlv, lambda_v, k, k, bos, i_h, o_p, o_s, m_p, m_s, H, P, S)
    for t in range(bos, eos):
        b_vlv, b_lv, b_k = n_vlv.to(tl.float32), n_lv.to(tl.float32), n_k.to(tl.float32)
        n_vlv, n_lv, n_k, _ = load_token(vlv, lambda_v, k, k, tl.minimum(t + 1, eos - 1), i_h, o_p, o_s, m_p, m_s, H, P, S)
        b_phi = (b_k * b_k)[:, None] * b_lv[None, :]
        b_r = b_k[:, None] * b_vlv[None, :]
        b_u = 1.0 + b_noise * b_phi
        b_w = b_phi * b_a2
        b_rp = b_r * b_noise
        b_ra2 = b_r * b_a2
        b_A, b_B, b_C, b_D, b_E, b_F, b_G = (
            b_u * b_A + b_w * b_C,
            b_u * b_B + b_w * b_D,
            b_noise * b_A + b_a2 * b_C,
            b_noise * b_B + b_a2 * b_D,
            b_rp * b_A + b_a * b_E + b_ra2 * b_C,
            b_rp * b_B + b_a * b_F + b_ra2 * b_D,
            b_a * b_G,
        )
        if (t - bos) % RESCALE_EVERY == RESCALE_EVERY - 1:
            b_s = 1.0 / (b_A + b_D)
            b_A, b_B, b_C, b_D, b_E, b_F, b_G = (
                b_A * b_s, b_B * b_s, b_C * b_s, b_D * b_s, b_E * b_s, b_F * b_s, b_G * b_s
            )
    b_s = 1.0 / (b_A + b_D)
    n_state = tl.num_programs(0).to(tl.int64) // H * H * P * S
    o_state = state_offsets(i_n, i_h, o_p, o_s, H, P, S)
    tl.store(out + o_state, b_A * b_s, mask=m_sp)
    tl.store(out + n_state + o_state, b_B * b_s, mask=m_sp)
    tl.store(out + 2 * n_state + o_state, b_C * b_s, mask=m_sp)
    tl.store(out + 3 * n_state + o_state, b_D * b_s, mask=m_sp)
    tl.store(out + 4 * n_state + o_state, b_E * b_s, mask=m_sp)
    tl.store(out + 5 * n_state + o_state, b_F * b_s, mask=m_sp)
    tl.store(out + 6 * n_state + o_state, b_G * b_s, mask=m_sp)


def triton_chunk_transforms(v_lambda_v, lambda_v, k, a, p, *, cu_seqlens=None):
    """Normalised 7-number transform from identity of each sequence: ``[7, N, H, P, S]`` fp32.
    Same contract as :func:`kla_megatron.ops.kla.carry.chunk_transforms`."""
    B, L, H, P = v_lambda_v.shape
    S = k.shape[-1]
    v_lambda_v, lambda_v, k = (x.contiguous() for x in (v_lambda_v, lambda_v, k))
    a, p = a.float().contiguous(), p.float().contiguous()
    n_seq, T, cu, is_varlen = prepare_rows(v_lambda_v, cu_seqlens)
    a, p = to_kernel(a), to_kernel(p)
    out = torch.empty(7, n_seq, H, S, P, dtype=torch.float32, device=v_lambda_v.device)
    BP, BS, warps = block_sizes(P, S)
    grid = (n_seq * H, triton.cdiv(P, BP))
    _kla_transform_kernel[grid](v_lambda_v, lambda_v, k, a, p, out, cu, T, H=H, P=P, S=S, BP=BP, BS=BS,
                                RESCALE_EVERY=RESCALE_EVERY, IS_VARLEN=is_varlen, num_warps=warps)
    return from_kernel(out)


def triton_end_adjoint_maps(v, lambda_v, k, q, a, p, grad_y, grad_y_var, initial_state, *,
                            grad_final_state=None, cu_seqlens=None):
    """``(Q [3, N, H, P, S], o [2, N, H, P, S])`` with ``c_start = Qᵀ·c_end + o`` in (μ, σ)
    adjoint coordinates. Same contract as :func:`kla_megatron.ops.kla.carry.end_adjoint_maps`;
    one forward sweep (:func:`triton_forward_adjoint_maps`)."""
    v, lambda_v, k, q, grad_y, grad_y_var = (x.contiguous() for x in (v, lambda_v, k, q, grad_y, grad_y_var))
    a, p = a.float().contiguous(), p.float().contiguous()
    lam0, eta0 = (s.float().contiguous() for s in initial_state)
    return triton_forward_adjoint_maps(v, lambda_v, k, q, a, p, lam0, eta0, grad_y, grad_y_var,
                                       grad_final_state=grad_final_state, cu_seqlens=cu_seqlens)


@triton.jit
def _kla_bwd_map_kernel(
    v, lambda_v, k, q, a, p, lam0, eta0, d_y, d_yvar, end_a, end_b, map_q, map_o, cu_seqlens, T,
    H: tl.constexpr, P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_VAR: tl.constexpr, END_ADJOINT: tl.constexpr, FAST_RCP: tl.constexpr,
):
    """Adjoint map (Q, o) of each sequence in ONE forward sweep, without replay or parking.

    The reverse step t maps the carry c = (cM, cS) arriving from step t+1 affinely,
    F_t(c) = G_t·c + h_t with G_t = [[aι, 0], [a²ι²·innov, a²ι²]] and
    h_t = (aι·q·g^y, a²ι²·(q²·g^v + innov·q·g^y)); every factor is known in the forward at
    step t. The whole map F_1∘…∘F_n = (L, o) is composed in forward order:
    o ← o + L·h_t, then L ← L·G_t (L lower-triangular: 3 numbers; products of gains ≤ 1).
    END_ADJOINT modes as in ``_kla_bwd_kernel`` (0: none; 1: the
    cotangent (ḡλ, ḡη) of the final state, read at the state this sweep ends in; 2: the (μ, σ)
    adjoint itself), the end adjoint folded into o.
    """
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_p, o_s, m_p, m_s, m_sp = channel_lanes(i_p, P, S, BP, BS)
    b_a, b_a2, b_noise = load_dynamics(a, p, i_h, o_p, o_s, m_sp, H, P, S)
    o_state = state_offsets(i_n, i_h, o_p, o_s, H, P, S)
    b_sigma = 1.0 / tl.load(lam0 + o_state, mask=m_sp, other=1.0).to(tl.float32)
    b_mu = tl.load(eta0 + o_state, mask=m_sp, other=0.0).to(tl.float32) * b_sigma
    b_lmm = tl.full([BS, BP], 1.0, tl.float32)
    b_lms = tl.zeros([BS, BP], tl.float32)
    b_lss = tl.full([BS, BP], 1.0, tl.float32)
    b_om = tl.zeros([BS, BP], tl.float32)
    b_os = tl.zeros([BS, BP], tl.float32)
    n_v, n_lv, n_k, n_q = load_token(v, lambda_v, k, q, bos, i_h, o_p, o_s, m_p, m_s, H, P, S)
    for t in range(bos, eos):
        b_v, b_lv, b_k, b_q = n_v, n_lv, n_k, n_q
        n_v, n_lv, n_k, n_q = load_token(v, lambda_v, k, q, tl.minimum(t + 1, eos - 1), i_h, o_p, o_s, m_p, m_s,
                                          H, P, S)
        o_tp = (t * H + i_h) * P + o_p
        b_gy = tl.load(d_y + o_tp, mask=m_p, other=0.0).to(tl.float32)
        b_phi, b_r = observation(b_v, b_lv, b_k)
        b_innov = b_r - b_phi * b_a * b_mu  # with the prior mean μ_{t−1}
        b_sigma, b_mu, b_iota = update_step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise, FAST_RCP)
        b_q = b_q.to(tl.float32)
        b_gmm = b_a * b_iota
        b_gss = b_a2 * b_iota * b_iota
        b_inj = b_q[:, None] * b_gy[None, :]  # q·g^y
        if HAS_VAR:
            b_gv = tl.load(d_yvar + o_tp, mask=m_p, other=0.0).to(tl.float32)
            b_injs = (b_q * b_q)[:, None] * b_gv[None, :] + b_innov * b_inj
        else:
            b_injs = b_innov * b_inj
        b_hm = b_gmm * b_inj
        b_hs = b_gss * b_injs
        b_om += b_lmm * b_hm
        b_os += b_lms * b_hm + b_lss * b_hs
        b_lms = b_lms * b_gmm + b_lss * b_gss * b_innov
        b_lmm = b_lmm * b_gmm
        b_lss = b_lss * b_gss
    if END_ADJOINT != 0:
        b_em = tl.load(end_a + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_es = tl.load(end_b + o_state, mask=m_sp, other=0.0).to(tl.float32)
        if END_ADJOINT == 1:
            # (λ, η) = (1/σ, μ/σ): dμ = ḡη/σ, dσ = −(ḡλ + ḡη·μ)/σ²
            b_em, b_es = b_es / b_sigma, -(b_em + b_es * b_mu) / (b_sigma * b_sigma)
        b_om += b_lmm * b_em
        b_os += b_lms * b_em + b_lss * b_es
    n_state = tl.num_programs(0).to(tl.int64) // H * H * P * S
    tl.store(map_q + o_state, b_lmm, mask=m_sp)
    tl.store(map_q + n_state + o_state, b_lms, mask=m_sp)
    tl.store(map_q + 2 * n_state + o_state, b_lss, mask=m_sp)
    tl.store(map_o + o_state, b_om, mask=m_sp)
    tl.store(map_o + n_state + o_state, b_os, mask=m_sp)


def triton_forward_adjoint_maps(v, lambda_v, k, q, a, p, lam0, eta0, d_y, d_yvar, *, end_adjoint=None,
                                grad_final_state=None, cu_seqlens=None):
    """``(Q [3, N, H, P, S], o [2, N, H, P, S])`` of every sequence from one forward sweep
    (``_kla_bwd_map_kernel``), at the cost of a forward pass: no replay, no parked states. The end adjoint comes as ``end_adjoint`` ``[2, N, H, P, S]`` in (μ, σ)
    adjoint coordinates, or as the cotangent ``grad_final_state`` ``(d_lam, d_eta)`` of the final
    state (either may be None), or not at all; ``d_yvar`` None when y_var has no cotangent."""
    B, L, H, P = v.shape
    S = k.shape[-1]
    n_seq, T, cu, is_varlen = prepare_rows(v, cu_seqlens)
    a, p, lam0, eta0 = (to_kernel(x) for x in (a, p, lam0, eta0))
    state_shape = (n_seq, H, S, P)
    map_q = torch.empty(3, *state_shape, dtype=torch.float32, device=v.device)
    map_o = torch.empty(2, *state_shape, dtype=torch.float32, device=v.device)
    if end_adjoint is not None:
        mode, end_a, end_b = 2, to_kernel(end_adjoint[0]), to_kernel(end_adjoint[1])
    elif grad_final_state is not None:
        mode = 1
        end_a, end_b = (torch.zeros(state_shape, dtype=torch.float32, device=v.device) if g is None else to_kernel(g)
                        for g in grad_final_state)
    else:
        mode, end_a, end_b = 0, map_o, map_o
    BP, BS, warps = block_sizes(P, S)
    grid = (n_seq * H, triton.cdiv(P, BP))
    _kla_bwd_map_kernel[grid](
        v, lambda_v, k, q, a, p, lam0, eta0, d_y, d_y if d_yvar is None else d_yvar, end_a, end_b, map_q, map_o, cu,
        T, H=H, P=P, S=S, BP=BP, BS=BS, IS_VARLEN=is_varlen, HAS_VAR=d_yvar is not None, END_ADJOINT=mode,
        FAST_RCP=is_gpu_compiled(v), num_warps=warps,
    )
    return from_kernel(map_q), from_kernel(map_o)
