"""Triton versions of the chunk summaries in :mod:`.carry` (same signatures, same layouts).

- :func:`triton_chunk_transforms`: one sequential pass per lane composing the undivided
  leaf maps of §3 (T ← M_t·T), rescaled by 1/(A+D) every 8 tokens; reads v·Λv, Λv and k
  only. ``[7, N, H, P, S]``.
- :func:`triton_end_adjoint_maps`: the forward kernel (for checkpoints) then the backward
  kernel in ``map_only`` mode, which accumulates the gain products Q and the start adjoint
  o with a zero end adjoint. ``(Q [3, N, H, P, S], o [2, N, H, P, S])``.

Used by the time-split scan (:mod:`.chunk_split`) and by context parallelism.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import (_blocks, _dynamics, _lanes, _load_token, _prepare, _seq_bounds, _state_offsets,
                    from_kernel, kla_bwd, kla_fwd, to_kernel)

RESCALE_EVERY = 8


@triton.jit
def _kla_transform_kernel(
    vlv, lambda_v, k, a, p, out, cu_seqlens, T,
    H: tl.constexpr, P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
    RESCALE_EVERY: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_p, o_s, m_p, m_s, m_sp = _lanes(i_p, P, S, BP, BS)
    b_a, b_a2, b_noise = _dynamics(a, p, i_h, o_p, o_s, m_sp, H, P, S)
    one = tl.full([BS, BP], 1.0, tl.float32)
    zero = tl.zeros([BS, BP], tl.float32)
    b_A, b_B, b_C, b_D, b_E, b_F, b_G = one, zero, zero, one, zero, zero, one
    # v·Λv arrives as one product and travels in _load_token's v slot; its q slot is unused.
    n_vlv, n_lv, n_k, _ = _load_token(vlv, lambda_v, k, k, bos, i_h, o_p, o_s, m_p, m_s, H, P, S)
    for t in range(bos, eos):
        b_vlv, b_lv, b_k = n_vlv.to(tl.float32), n_lv.to(tl.float32), n_k.to(tl.float32)
        n_vlv, n_lv, n_k, _ = _load_token(vlv, lambda_v, k, k, tl.minimum(t + 1, eos - 1), i_h, o_p, o_s, m_p, m_s, H, P, S)
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
    o_state = _state_offsets(i_n, i_h, o_p, o_s, H, P, S)
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
    n_seq, T, cu, is_varlen = _prepare(v_lambda_v, cu_seqlens)
    a, p = to_kernel(a), to_kernel(p)
    out = torch.empty(7, n_seq, H, S, P, dtype=torch.float32, device=v_lambda_v.device)
    BP, BS, warps = _blocks(P, S)
    grid = (n_seq * H, triton.cdiv(P, BP))
    _kla_transform_kernel[grid](v_lambda_v, lambda_v, k, a, p, out, cu, T, H=H, P=P, S=S, BP=BP, BS=BS,
                                RESCALE_EVERY=RESCALE_EVERY, IS_VARLEN=is_varlen, num_warps=warps)
    return from_kernel(out)


def triton_end_adjoint_maps(v, lambda_v, k, q, a, p, grad_y, grad_y_var, initial_state, *,
                            grad_final_state=None, cu_seqlens=None):
    """``(Q [3, N, H, P, S], o [2, N, H, P, S])`` with ``c_start = Qᵀ·c_end + o`` in (μ, σ)
    adjoint coordinates. Same contract as :func:`kla_megatron.ops.kla.carry.end_adjoint_maps`."""
    v, lambda_v, k, q, grad_y, grad_y_var = (x.contiguous() for x in (v, lambda_v, k, q, grad_y, grad_y_var))
    a, p = a.float().contiguous(), p.float().contiguous()
    lam0, eta0 = (s.float().contiguous() for s in initial_state)
    _, _, final, ck = kla_fwd(v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens,
                              output_final_state=grad_final_state is not None, save_checkpoints=True)
    d_lam_t, d_eta_t = grad_final_state if grad_final_state is not None else (None, None)
    return kla_bwd(v, lambda_v, k, q, a, p, lam0, eta0, final, ck, cu_seqlens,
                   grad_y, grad_y_var, d_lam_t, d_eta_t, deterministic=True, map_only=True)
