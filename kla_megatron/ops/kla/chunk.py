"""Triton training kernels for the KLA scan: fused forward and exact backward.

Stages (kla_math.md §4–§5):

1. ``_kla_fwd_kernel``: one program owns BP channels × all S states of one (sequence,
   head) and walks time with the covariance-form state (σ, μ) in fp32 registers,
   writing y, y_var and, every CHUNK tokens, a checkpoint of the state. [B, L, H, P, S]
   never touches memory.
2. ``_kla_bwd_kernel``: walks the chunks backwards; for each it replays the forward
   from the checkpoint, parking the CHUNK prior states in a per-program scratch block
   (L2-resident), then runs the contractive covariance-form adjoint recursion in
   reverse. (Holding them in registers needs a fully unrolled loop, which Triton
   3.6 takes many minutes to compile.)
   dv and dλv are reduced over S inside the program; dk and dq are reduced over the
   program's channels, then either atomically added (fast) or written to a per-block
   partial buffer and summed (``deterministic=True``, bitwise reproducible).
   da and dp are accumulated in registers and written once per program.

Packed sequences: all batch rows are viewed as one row of ``B·L`` tokens with
``cu_seqlens`` (implicit ``[0, L, 2L, …]`` without packing), so one code path serves
both. Checkpoint slot of chunk j of sequence n: ``n + (bos_n + j·CHUNK) // CHUNK``
(collision-free for any segmentation; at most N + ceil(T / CHUNK) slots).

Rows too few to fill the GPU are cut in time by :mod:`.chunk_split`, which reuses both
kernels over segments plus the transform and adjoint-map passes of :mod:`.chunk_carry`.

Kernel naming: ``b_`` block values, ``p_`` pointers, ``o_`` offsets, ``m_`` masks,
``i_`` program ids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 32
# Lanes (channels × states) per program and warps per program, the best of
# bench/tune_scan.py on an H200 at B8·L4096·M4096·S16 (2026-11-28: forward 5.5 ms at
# 256/4 vs 8.5 ms at 128/4; backward 28.0 ms at 256/4 vs 41.6 ms at 128/4). Module
# attributes so the tuner can sweep them. Unrolling the time loops by 8 was measured
# slower (backward 76 ms vs 49 ms fwd+bwd) and is not used.
FWD_LANES, FWD_WARPS = 256, 4
BWD_LANES, BWD_WARPS = 256, 4


@triton.jit
def _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def _lanes(i_p, P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr):
    """Offsets and masks of one program's [BP channels, BS states] block of lanes."""
    o_p = i_p * BP + tl.arange(0, BP)
    o_s = tl.arange(0, BS)
    m_p, m_s = o_p < P, o_s < S
    return o_p, o_s, m_p, m_s, m_p[:, None] & m_s[None, :], o_p[:, None] * S + o_s[None, :]


@triton.jit
def _dynamics(a, p, i_h, o_ps, m_ps, P: tl.constexpr, S: tl.constexpr):
    """(a, a², p) of the lane block; padding lanes get a = 1, p = 0 (no NaN anywhere)."""
    b_a = tl.load(a + i_h * P * S + o_ps, mask=m_ps, other=1.0).to(tl.float32)
    b_noise = tl.load(p + i_h * P * S + o_ps, mask=m_ps, other=0.0).to(tl.float32)
    return b_a, b_a * b_a, b_noise


@triton.jit
def _observe(v, lambda_v, k, t, i_h, o_p, o_s, m_p, m_s, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    """Token t's inputs for the lane block: v, Λv [BP], k [BS], and φ = Λv·k², r = v·Λv·k."""
    b_v = tl.load(v + (t * H + i_h) * P + o_p, mask=m_p, other=0.0).to(tl.float32)
    b_lv = tl.load(lambda_v + (t * H + i_h) * P + o_p, mask=m_p, other=0.0).to(tl.float32)
    b_k = tl.load(k + (t * H + i_h) * S + o_s, mask=m_s, other=0.0).to(tl.float32)
    b_phi = b_lv[:, None] * (b_k * b_k)[None, :]
    b_r = (b_v * b_lv)[:, None] * b_k[None, :]
    return b_v, b_lv, b_k, b_phi, b_r


@triton.jit
def _step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise):
    """One covariance-form step (kla_math.md §4): returns posterior (σ, μ) and the gain ι."""
    b_prior = b_a2 * b_sigma + b_noise
    b_iota = 1.0 / (1.0 + b_phi * b_prior)
    return b_prior * b_iota, (b_a * b_mu + b_r * b_prior) * b_iota, b_iota


@triton.jit
def _kla_fwd_kernel(
    v, lambda_v, k, q, a, p, lam0, eta0,
    y, y_var, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens,
    T, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    BP: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)

    o_p, o_s, m_p, m_s, m_ps, o_ps = _lanes(i_p, P, S, BP, BS)

    b_a, b_a2, b_noise = _dynamics(a, p, i_h, o_ps, m_ps, P, S)
    o_state = (i_n * H + i_h) * P * S + o_ps
    if USE_INITIAL_STATE:
        b_lam = tl.load(lam0 + o_state, mask=m_ps, other=1.0).to(tl.float32)
        b_eta = tl.load(eta0 + o_state, mask=m_ps, other=0.0).to(tl.float32)
        b_sigma = 1.0 / b_lam
        b_mu = b_eta * b_sigma
    else:
        b_sigma = tl.full([BP, BS], 1.0, tl.float32)
        b_mu = tl.zeros([BP, BS], tl.float32)

    slot = i_n + bos // CHUNK
    for t0 in range(bos, eos, CHUNK):
        if SAVE_CHECKPOINTS:
            o_ck = (slot * H + i_h) * P * S + o_ps
            tl.store(ck_sigma + o_ck, b_sigma, mask=m_ps)
            tl.store(ck_mu + o_ck, b_mu, mask=m_ps)
        slot += 1
        for t in range(t0, tl.minimum(t0 + CHUNK, eos)):
            o_tp = (t * H + i_h) * P + o_p
            b_v, b_lv, b_k, b_phi, b_r = _observe(v, lambda_v, k, t, i_h, o_p, o_s, m_p, m_s, H, P, S)
            b_q = tl.load(q + (t * H + i_h) * S + o_s, mask=m_s, other=0.0).to(tl.float32)
            b_sigma, b_mu, b_iota = _step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise)
            b_y = tl.sum(b_q[None, :] * b_mu, axis=1)
            b_yv = tl.sum((b_q * b_q)[None, :] * b_sigma, axis=1)
            tl.store(y + o_tp, b_y.to(y.dtype.element_ty), mask=m_p)
            tl.store(y_var + o_tp, b_yv.to(y_var.dtype.element_ty), mask=m_p)

    if STORE_FINAL_STATE:
        b_lam = 1.0 / b_sigma
        tl.store(lam_t + o_state, b_lam, mask=m_ps)
        tl.store(eta_t + o_state, b_mu * b_lam, mask=m_ps)


@triton.jit
def _kla_bwd_kernel(
    v, lambda_v, k, q, a, p, lam0, eta0, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens, scratch,
    d_y, d_yvar, d_lam_t, d_eta_t,
    d_v, d_lv, d_k, d_q, d_a, d_p, d_lam0, d_eta0, map_q, map_o,
    T, n_tokens, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    BP: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, END_ADJOINT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DETERMINISTIC: tl.constexpr, N_PBLOCKS: tl.constexpr,
    MAP_ONLY: tl.constexpr,
):
    # END_ADJOINT: 0 = none, 1 = cotangent of the final (lam, eta), 2 = adjoint of the final
    # (mu, sigma) given directly (time-split and context-parallel carries).
    # MAP_ONLY: compute only the affine end-to-start adjoint map (Q, o) of kla_math.md §6.
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = _seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)

    o_p, o_s, m_p, m_s, m_ps, o_ps = _lanes(i_p, P, S, BP, BS)
    b_a, b_a2, b_noise = _dynamics(a, p, i_h, o_ps, m_ps, P, S)
    o_state = (i_n * H + i_h) * P * S + o_ps

    # Carries: cM = a·ι_{t+1}·M̄_{t+1}, cS = a²·P̄_{t+1}; seeded by the final-state cotangent.
    b_cM = tl.zeros([BP, BS], tl.float32)
    b_cS = tl.zeros([BP, BS], tl.float32)
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    if END_ADJOINT == 2:
        b_cM = tl.load(d_lam_t + o_state, mask=m_ps, other=0.0).to(tl.float32)
        b_cS = tl.load(d_eta_t + o_state, mask=m_ps, other=0.0).to(tl.float32)
    if END_ADJOINT == 1:
        # (λ, η) = (1/σ, μ/σ): dσ = −(ḡλ + ḡη·μ)·λ², dμ = ḡη·λ.
        b_lam = tl.load(lam_t + o_state, mask=m_ps, other=1.0)
        b_eta = tl.load(eta_t + o_state, mask=m_ps, other=0.0)
        b_glam = tl.load(d_lam_t + o_state, mask=m_ps, other=0.0).to(tl.float32)
        b_geta = tl.load(d_eta_t + o_state, mask=m_ps, other=0.0).to(tl.float32)
        b_cM = b_geta * b_lam
        b_cS = -(b_glam + b_geta * b_eta / b_lam) * b_lam * b_lam

    b_da = tl.zeros([BP, BS], tl.float32)
    b_dp = tl.zeros([BP, BS], tl.float32)
    # Running map from the end adjoint to the current one (products of gains ≤ 1).
    b_Rmm = tl.full([BP, BS], 1.0, tl.float32)
    b_Rms = tl.zeros([BP, BS], tl.float32)
    b_Rss = tl.full([BP, BS], 1.0, tl.float32)
    i_prog = i_nh.to(tl.int64) * N_PBLOCKS + i_p
    p_scr_sigma = scratch + i_prog * 2 * CHUNK * BP * BS
    p_scr_mu = p_scr_sigma + CHUNK * BP * BS
    o_scr = tl.arange(0, BP)[:, None] * BS + o_s[None, :]
    for j in range(n_chunks - 1, -1, -1):
        t0 = bos + j * CHUNK
        o_ck = ((i_n + t0 // CHUNK) * H + i_h) * P * S + o_ps
        b_sigma = tl.load(ck_sigma + o_ck, mask=m_ps, other=1.0)
        b_mu = tl.load(ck_mu + o_ck, mask=m_ps, other=0.0)
        # Replay the chunk, parking each step's prior state in this program's scratch rows
        # (written and read by the same program, so they stay hot in L2).
        n_steps = tl.minimum(CHUNK, eos - t0)
        for i in range(0, n_steps):
            t = t0 + i
            tl.store(p_scr_sigma + i * BP * BS + o_scr, b_sigma)
            tl.store(p_scr_mu + i * BP * BS + o_scr, b_mu)
            _, _, _, b_phi, b_r = _observe(v, lambda_v, k, t, i_h, o_p, o_s, m_p, m_s, H, P, S)
            b_sigma, b_mu, _ = _step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise)
        tl.debug_barrier()
        for i in range(n_steps - 1, -1, -1):
            t = t0 + i
            o_tp = (t * H + i_h) * P + o_p
            o_ts = (t * H + i_h) * S + o_s
            b_v, b_lv, b_k, b_phi, b_r = _observe(v, lambda_v, k, t, i_h, o_p, o_s, m_p, m_s, H, P, S)
            b_q = tl.load(q + o_ts, mask=m_s, other=0.0).to(tl.float32)
            b_gy = tl.load(d_y + o_tp, mask=m_p, other=0.0).to(tl.float32)
            b_gv = tl.load(d_yvar + o_tp, mask=m_p, other=0.0).to(tl.float32)
            b_sp = tl.load(p_scr_sigma + i * BP * BS + o_scr)
            b_mp = tl.load(p_scr_mu + i * BP * BS + o_scr)
            b_vlv = b_v * b_lv
            b_sigma, b_mu, b_iota = _step(b_sp, b_mp, b_phi, b_r, b_a, b_a2, b_noise)

            b_M = b_gy[:, None] * b_q[None, :] + b_cM
            b_S = b_gv[:, None] * (b_q * b_q)[None, :] + b_cS
            # P̄ = ι(ι·S̄ + (r − φ·μ_t)·M̄), with r − φ·μ_t = ι·(r − φ·a·μ_{t−1}): the second
            # form avoids cancelling r against φ·μ_t ≈ r when observations are sharp.
            b_innov = b_r - b_phi * b_a * b_mp
            b_P = b_iota * b_iota * (b_S + b_innov * b_M)
            b_cM = b_a * b_iota * b_M
            b_cS = b_a2 * b_P
            if MAP_ONLY:
                b_gmm = b_a * b_iota
                b_gss = b_a2 * b_iota * b_iota
                b_Rms = b_gss * b_innov * b_Rmm + b_gss * b_Rms
                b_Rmm = b_gmm * b_Rmm
                b_Rss = b_gss * b_Rss
            else:
                b_dphi = -b_sigma * (b_sigma * b_S + b_mu * b_M)
                b_dr = b_sigma * b_M
                b_da += 2.0 * b_a * b_sp * b_P + b_iota * b_mp * b_M
                b_dp += b_P
                b_dvlv = tl.sum(b_dr * b_k[None, :], axis=1)
                b_dlv = tl.sum(b_dphi * (b_k * b_k)[None, :], axis=1) + b_v * b_dvlv
                tl.store(d_v + o_tp, (b_lv * b_dvlv).to(d_v.dtype.element_ty), mask=m_p)
                tl.store(d_lv + o_tp, b_dlv.to(d_lv.dtype.element_ty), mask=m_p)
                b_dk = tl.sum(2.0 * b_lv[:, None] * b_k[None, :] * b_dphi + b_vlv[:, None] * b_dr, axis=0)
                b_dq = tl.sum(b_gy[:, None] * b_mu + 2.0 * b_gv[:, None] * b_q[None, :] * b_sigma, axis=0)
                if DETERMINISTIC or N_PBLOCKS == 1:
                    # One partial row per channel block: [N_PBLOCKS, tokens, H, S], summed outside.
                    o_part = i_p.to(tl.int64) * n_tokens * H * S + o_ts
                    tl.store(d_k + o_part, b_dk, mask=m_s)
                    tl.store(d_q + o_part, b_dq, mask=m_s)
                else:
                    tl.atomic_add(d_k + o_ts, b_dk, mask=m_s, sem="relaxed")
                    tl.atomic_add(d_q + o_ts, b_dq, mask=m_s, sem="relaxed")

    if MAP_ONLY:
        n_state = tl.num_programs(0).to(tl.int64) // H * H * P * S
        tl.store(map_q + o_state, b_Rmm, mask=m_ps)
        tl.store(map_q + n_state + o_state, b_Rms, mask=m_ps)
        tl.store(map_q + 2 * n_state + o_state, b_Rss, mask=m_ps)
        tl.store(map_o + o_state, b_cM, mask=m_ps)
        tl.store(map_o + n_state + o_state, b_cS, mask=m_ps)
    else:
        o_param = (i_n * H + i_h) * P * S + o_ps
        tl.store(d_a + o_param, b_da, mask=m_ps)
        tl.store(d_p + o_param, b_dp, mask=m_ps)
        if USE_INITIAL_STATE:
            b_lam = tl.load(lam0 + o_state, mask=m_ps, other=1.0).to(tl.float32)
            b_eta = tl.load(eta0 + o_state, mask=m_ps, other=0.0).to(tl.float32)
            b_s0 = 1.0 / b_lam
            b_m0 = b_eta * b_s0
            tl.store(d_lam0 + o_state, -b_s0 * (b_s0 * b_cS + b_m0 * b_cM), mask=m_ps)
            tl.store(d_eta0 + o_state, b_s0 * b_cM, mask=m_ps)


def _blocks(P: int, S: int, lanes: int):
    BS = triton.next_power_of_2(S)
    BP = max(1, min(triton.next_power_of_2(P), lanes // BS))
    return BP, BS


def _prepare(v, cu_seqlens):
    """Flatten rows into one token axis; returns (n_seq, T per row or 0, cu_seqlens or dummy)."""
    B, L = v.shape[:2]
    if cu_seqlens is None:
        return B, L, v.new_empty(1, dtype=torch.int32), False
    return cu_seqlens.numel() - 1, 0, cu_seqlens.to(device=v.device, dtype=torch.int32).contiguous(), True


def kla_fwd(v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens, output_final_state, save_checkpoints):
    B, L, H, P = v.shape
    S = k.shape[-1]
    n_seq, T, cu, is_varlen = _prepare(v, cu_seqlens)
    y = torch.empty_like(v)
    y_var = torch.empty_like(v)
    state_shape = (n_seq, H, P, S)
    lam_t = v.new_empty(state_shape, dtype=torch.float32) if output_final_state else y
    eta_t = v.new_empty(state_shape, dtype=torch.float32) if output_final_state else y
    n_slots = n_seq + triton.cdiv(B * L, CHUNK)
    ck_shape = (n_slots, H, P, S) if save_checkpoints else (1,)
    ck_sigma = v.new_empty(ck_shape, dtype=torch.float32)
    ck_mu = v.new_empty(ck_shape, dtype=torch.float32)
    BP, BS = _blocks(P, S, FWD_LANES)
    grid = (n_seq * H, triton.cdiv(P, BP))
    _kla_fwd_kernel[grid](
        v, lambda_v, k, q, a, p,
        lam0 if lam0 is not None else y, eta0 if eta0 is not None else y,
        y, y_var, lam_t, eta_t, ck_sigma, ck_mu, cu,
        T, H=H, P=P, S=S, BP=BP, BS=BS, CHUNK=CHUNK,
        USE_INITIAL_STATE=lam0 is not None, STORE_FINAL_STATE=output_final_state,
        SAVE_CHECKPOINTS=save_checkpoints, IS_VARLEN=is_varlen, num_warps=FWD_WARPS,
    )
    final = (lam_t, eta_t) if output_final_state else None
    return y, y_var, final, (ck_sigma, ck_mu)


def kla_bwd(v, lambda_v, k, q, a, p, lam0, eta0, final, checkpoints, cu_seqlens,
            d_y, d_yvar, d_lam_t, d_eta_t, deterministic, end_adjoint=None, map_only=False):
    """Gradients of the scan, or with ``map_only`` its adjoint maps (Q, o).

    The end adjoint comes either as the cotangent ``(d_lam_t, d_eta_t)`` of the final state
    or, with ``end_adjoint`` ``[2, N, H, P, S]``, directly as the (μ, σ) adjoint.
    """
    B, L, H, P = v.shape
    S = k.shape[-1]
    n_seq, T, cu, is_varlen = _prepare(v, cu_seqlens)
    BP, BS = _blocks(P, S, BWD_LANES)
    n_pblocks = triton.cdiv(P, BP)
    partial = deterministic or n_pblocks == 1
    f32 = dict(dtype=torch.float32, device=v.device)
    state_shape = (n_seq, H, P, S)
    dummy = torch.empty(1, **f32)
    if map_only:
        d_v = d_lv = d_k = d_q = d_a = d_p = d_lam0 = d_eta0 = dummy
        map_q, map_o = torch.empty(3, *state_shape, **f32), torch.empty(2, *state_shape, **f32)
    else:
        dk_shape = (n_pblocks, B * L, H, S) if partial else (B * L, H, S)
        alloc = torch.empty if partial else torch.zeros
        d_k, d_q = alloc(dk_shape, **f32), alloc(dk_shape, **f32)
        d_v, d_lv = torch.empty_like(v), torch.empty_like(lambda_v)
        d_a, d_p = torch.empty(state_shape, **f32), torch.empty(state_shape, **f32)
        d_lam0 = torch.empty(state_shape, **f32) if lam0 is not None else dummy
        d_eta0 = torch.empty(state_shape, **f32) if lam0 is not None else dummy
        map_q = map_o = dummy
    if end_adjoint is not None:
        mode, end_a, end_b = 2, end_adjoint[0].contiguous(), end_adjoint[1].contiguous()
    elif d_lam_t is not None or d_eta_t is not None:
        mode = 1
        end_a = torch.zeros_like(final[0]) if d_lam_t is None else d_lam_t.contiguous()
        end_b = torch.zeros_like(final[1]) if d_eta_t is None else d_eta_t.contiguous()
    else:
        mode, end_a, end_b = 0, dummy, dummy
    lam_t, eta_t = final if final is not None else (dummy, dummy)
    grid = (n_seq * H, n_pblocks)
    scratch = torch.empty(grid[0] * grid[1] * 2 * CHUNK * BP * BS, **f32)
    _kla_bwd_kernel[grid](
        v, lambda_v, k, q, a, p,
        lam0 if lam0 is not None else dummy, eta0 if eta0 is not None else dummy, lam_t, eta_t,
        checkpoints[0], checkpoints[1], cu, scratch,
        d_y, d_yvar, end_a, end_b,
        d_v, d_lv, d_k, d_q, d_a, d_p, d_lam0, d_eta0, map_q, map_o,
        T, B * L, H=H, P=P, S=S, BP=BP, BS=BS, CHUNK=CHUNK,
        USE_INITIAL_STATE=lam0 is not None, END_ADJOINT=mode,
        IS_VARLEN=is_varlen, DETERMINISTIC=deterministic, N_PBLOCKS=n_pblocks, MAP_ONLY=map_only,
        num_warps=BWD_WARPS,
    )
    if map_only:
        return map_q, map_o
    if partial:
        d_k, d_q = d_k.sum(0), d_q.sum(0)
    d_k = d_k.view(B, L, H, S).to(k.dtype)
    d_q = d_q.view(B, L, H, S).to(q.dtype)
    d_a = d_a.sum(0).to(a.dtype)
    d_p = d_p.sum(0).to(p.dtype)
    d_state = (d_lam0, d_eta0) if lam0 is not None else (None, None)
    return d_v, d_lv, d_k, d_q, d_a, d_p, *d_state
