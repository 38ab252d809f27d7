"""Triton training kernels for the KLA scan: fused forward and exact backward.

Lane layout (docs/kla.md#triton-training-kernels): a program owns BP channels of one (sequence, head) and
all S states of each; a thread holds **one channel's S states** in registers, so the
read-outs y = Σ_s q·μ and y_var = Σ_s q²·σ and the dv/dΛv sums are in-thread adds,
never shuffles. Tensors are ``[BS, BP]`` (state-major) so Triton's default layout puts
the channels across threads and wraps the states into registers; the per-token inputs
are loaded two tokens ahead so their memory latency hides behind the arithmetic.

1. ``_kla_fwd_kernel`` walks time with the covariance-form state (σ, μ) in fp32
   (docs/kla.md#sequential-forms), writes y, y_var and, every CHUNK tokens, a checkpoint of the state
   in the internal layout ``[slot, H, S, P]`` (channels contiguous: coalesced stores).
   [B, L, H, P, S] never touches memory.
2. ``_kla_bwd_kernel`` walks the chunks backwards; for each it replays the forward from
   the checkpoint, parking the CHUNK prior states in a per-program scratch block (or, with
   ``BWD_SUBCHUNK``, first the sub-block start states and then SUB steps at a time), then
   runs the contractive covariance-form adjoint recursion in reverse (the next step's
   inputs and parked state loaded one step ahead). dk and dq are summed over the program's
   channels — on the GPU by a warp reduce-scatter of inline PTX shuffles
   (``_warp_sum_16``) — then atomically added across a head's channel blocks
   (fast) or written to a per-block partial buffer and summed (``deterministic=True``,
   bitwise reproducible; also used when one block covers the head). da and dp stay in
   registers and are written once per program.

Packed sequences: all batch rows are viewed as one row of ``B·L`` tokens with
``cu_seqlens`` (implicit ``[0, L, 2L, …]`` without packing), so one code path serves
both. Checkpoint slot of chunk j of sequence n: ``n + (bos_n + j·CHUNK) // CHUNK``
(collision-free for any segmentation; at most N + ceil(T / CHUNK) slots).

Rows too few to fill the GPU are cut in time by :mod:`.chunk_split`, which reuses both
kernels over segments plus the transform and adjoint-map passes of :mod:`.chunk_carry`.

Kernel naming: ``b_`` block values, ``n_`` prefetched next-token values, ``p_``
pointers, ``o_`` offsets, ``m_`` masks, ``i_`` program ids.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (channel_lanes, from_kernel, is_gpu_compiled, load_dynamics, load_token, observation,
                            prepare_rows, seq_bounds, state_offsets, to_kernel, update_step)

CHUNK = 32
# Channels per program (one thread each; warps = channels / 32). One warp per program
# measured fastest on the H200 (bench/README.md run 4) and lets the dk/dq channel sums stay
# inside a warp. Module attributes so tests and bench/tune_scan.py can change them.
MAX_CHANNELS = 32
UPCAST_KQ = False  # measured slower (bench/README.md run 4)
# dk/dq channel sums by warp reduce-scatter (inline PTX shuffles: GPU, S = 16, 32 channels).
WARP_REDUCE = True
# Backward replay depth: 0 parks all CHUNK prior states per program (measured default); a
# divisor of CHUNK parks the sub-block starts first and then SUB states at a time, a 4×
# smaller scratch (128 KB → 32 KB per one-warp program at S = 16) that can stay in L2, for one
# more forward replay. Not yet measured on a GPU (bench/README.md, "Against the targets").
BWD_SUBCHUNK = 0


@triton.jit
def _kla_fwd_kernel(
    v, lambda_v, k, q, a, p, lam0, eta0,
    y, y_var, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens,
    T, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    BP: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, STORE_FINAL_STATE: tl.constexpr,
    SAVE_CHECKPOINTS: tl.constexpr, IS_VARLEN: tl.constexpr, FAST_RCP: tl.constexpr, STORE_VAR: tl.constexpr,
):
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_p, o_s, m_p, m_s, m_sp = channel_lanes(i_p, P, S, BP, BS)
    b_a, b_a2, b_noise = load_dynamics(a, p, i_h, o_p, o_s, m_sp, H, P, S)
    o_state = state_offsets(i_n, i_h, o_p, o_s, H, P, S)
    if USE_INITIAL_STATE:
        b_lam = tl.load(lam0 + o_state, mask=m_sp, other=1.0).to(tl.float32)
        b_eta = tl.load(eta0 + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_sigma = 1.0 / b_lam
        b_mu = b_eta * b_sigma
    else:
        b_sigma = tl.full([BS, BP], 1.0, tl.float32)
        b_mu = tl.zeros([BS, BP], tl.float32)

    # Two tokens in flight: token t's inputs were loaded two iterations ago.
    n1_v, n1_lv, n1_k, n1_q = load_token(v, lambda_v, k, q, bos, i_h, o_p, o_s, m_p, m_s, H, P, S)
    n2_v, n2_lv, n2_k, n2_q = load_token(v, lambda_v, k, q, tl.minimum(bos + 1, eos - 1), i_h, o_p, o_s, m_p, m_s, H, P, S)
    for t in range(bos, eos):
        b_v, b_lv, b_k, b_q = n1_v, n1_lv, n1_k, n1_q
        n1_v, n1_lv, n1_k, n1_q = n2_v, n2_lv, n2_k, n2_q
        n2_v, n2_lv, n2_k, n2_q = load_token(v, lambda_v, k, q, tl.minimum(t + 2, eos - 1), i_h, o_p, o_s, m_p, m_s, H, P, S)
        if SAVE_CHECKPOINTS:
            if (t - bos) % CHUNK == 0:
                slot = i_n + t // CHUNK
                tl.store(ck_sigma + state_offsets(slot, i_h, o_p, o_s, H, P, S), b_sigma, mask=m_sp)
                tl.store(ck_mu + state_offsets(slot, i_h, o_p, o_s, H, P, S), b_mu, mask=m_sp)
        b_phi, b_r = observation(b_v, b_lv, b_k)
        b_sigma, b_mu, _ = update_step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise, FAST_RCP)
        b_q = b_q.to(tl.float32)
        o_tp = (t * H + i_h) * P + o_p
        tl.store(y + o_tp, tl.sum(b_q[:, None] * b_mu, axis=0).to(y.dtype.element_ty), mask=m_p)
        if STORE_VAR:
            tl.store(y_var + o_tp, tl.sum((b_q * b_q)[:, None] * b_sigma, axis=0).to(y_var.dtype.element_ty), mask=m_p)

    if STORE_FINAL_STATE:
        b_lam = 1.0 / b_sigma
        tl.store(lam_t + o_state, b_lam, mask=m_sp)
        tl.store(eta_t + o_state, b_mu * b_lam, mask=m_sp)


@triton.jit
def _replay(v, lambda_v, k, q, t0, n, b_sigma, b_mu, p_sigma, p_mu, stride, o_scr, b_a, b_a2, b_noise,
            i_h, o_p, o_s, m_p, m_s, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
            EVERY: tl.constexpr, FAST_RCP: tl.constexpr):
    """Walk n steps from the state (σ, μ) before token t0, parking the prior state of every
    EVERY-th step at ``p_sigma`` / ``p_mu`` + (i // EVERY)·stride in this program's scratch
    (written and read by the same program). The next token's inputs load one step ahead."""
    n_v, n_lv, n_k, n_q = load_token(v, lambda_v, k, q, t0, i_h, o_p, o_s, m_p, m_s, H, P, S)
    for i in range(0, n):
        b_v, b_lv, b_k = n_v, n_lv, n_k
        n_v, n_lv, n_k, n_q = load_token(v, lambda_v, k, q, t0 + tl.minimum(i + 1, n - 1),
                                          i_h, o_p, o_s, m_p, m_s, H, P, S)
        if i % EVERY == 0:
            tl.store(p_sigma + (i // EVERY) * stride + o_scr, b_sigma)
            tl.store(p_mu + (i // EVERY) * stride + o_scr, b_mu)
        b_phi, b_r = observation(b_v, b_lv, b_k)
        b_sigma, b_mu, _ = update_step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise, FAST_RCP)
    tl.debug_barrier()


@triton.jit
def _load_reverse_step(v, lambda_v, k, q, d_y, d_yvar, p_scr_sigma, p_scr_mu, o_scr, t0, i,
                       i_h, o_p, o_s, m_p, m_s, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
                       BS: tl.constexpr, BP: tl.constexpr, HAS_VAR: tl.constexpr):
    """Everything step i of a chunk's reverse sweep reads: token inputs, the read-out
    cotangents (y_var's only if it has one) and the prior state parked in scratch by the replay."""
    t = t0 + i
    b_v, b_lv, b_k, b_q = load_token(v, lambda_v, k, q, t, i_h, o_p, o_s, m_p, m_s, H, P, S)
    o_tp = (t * H + i_h) * P + o_p
    b_gy = tl.load(d_y + o_tp, mask=m_p, other=0.0)
    if HAS_VAR:
        b_gv = tl.load(d_yvar + o_tp, mask=m_p, other=0.0)
    else:
        b_gv = b_gy  # unused
    b_sp = tl.load(p_scr_sigma + i * BS * BP + o_scr)
    b_mp = tl.load(p_scr_mu + i * BS * BP + o_scr)
    return b_v, b_lv, b_k, b_q, b_gy, b_gv, b_sp, b_mp


@triton.jit
def _shfl_xor(x, offset: tl.constexpr):
    return tl.inline_asm_elementwise("shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=f,f,r",
                                     [x, tl.full(x.shape, offset, tl.int32)], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _fold(x, lane, BIT: tl.constexpr, W: tl.constexpr):
    """One reduce-scatter level over a warp: x [2W, 32] (rows in registers, lane = column).
    Lanes with bit BIT set keep the upper W rows, the others the lower W; each sends the
    half it drops to its partner lane ``lane ^ 2**BIT`` and adds the half it receives."""
    lo, hi = tl.split(tl.permute(tl.reshape(x, [2, W, 32]), [1, 2, 0]))
    up = (((lane >> BIT) & 1) != 0)[None, :]
    return tl.where(up, hi, lo) + _shfl_xor(tl.where(up, lo, hi), 1 << BIT)


@triton.jit
def _warp_sum_16(x, lane):
    """Σ over the 32 lanes of a [16, 32] block: 16 shuffles instead of the 80 of a per-row
    butterfly (``tl.sum``). Lane l returns the sum of row l >> 1."""
    x = _fold(x, lane, 4, 8)
    x = _fold(x, lane, 3, 4)
    x = _fold(x, lane, 2, 2)
    x = tl.reshape(_fold(x, lane, 1, 1), [32])
    return x + _shfl_xor(x, 1)


@triton.jit
def _put(ptr, x, mask, ATOMIC: tl.constexpr):
    if ATOMIC:
        tl.atomic_add(ptr, x, mask=mask, sem="relaxed")
    else:
        tl.store(ptr, x, mask=mask)


@triton.jit
def _kla_bwd_kernel(
    v, lambda_v, k, q, a, p, lam0, eta0, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens, scratch,
    d_y, d_yvar, d_lam_t, d_eta_t,
    d_v, d_lv, d_k, d_q, d_a, d_p, d_lam0, d_eta0,
    T, n_tokens, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr,
    BP: tl.constexpr, BS: tl.constexpr, CHUNK: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr, END_ADJOINT: tl.constexpr,
    IS_VARLEN: tl.constexpr, DETERMINISTIC: tl.constexpr, N_PBLOCKS: tl.constexpr,
    FAST_RCP: tl.constexpr, WARP_REDUCE: tl.constexpr, SUB: tl.constexpr,
    HAS_VAR: tl.constexpr,
):
    # END_ADJOINT: 0 = none, 1 = cotangent of the final (lam, eta), 2 = adjoint of the final
    # (mu, sigma) given directly (time-split and context-parallel carries).
    ATOMIC: tl.constexpr = not (DETERMINISTIC or N_PBLOCKS == 1)
    i_nh, i_p = tl.program_id(0), tl.program_id(1)
    i_n, i_h = i_nh // H, i_nh % H
    bos, eos = seq_bounds(cu_seqlens, i_n, T, IS_VARLEN)
    o_p, o_s, m_p, m_s, m_sp = channel_lanes(i_p, P, S, BP, BS)
    b_a, b_a2, b_noise = load_dynamics(a, p, i_h, o_p, o_s, m_sp, H, P, S)
    o_state = state_offsets(i_n, i_h, o_p, o_s, H, P, S)

    # Carries: cM = a·ι_{t+1}·M̄_{t+1}, cS = a²·P̄_{t+1}; seeded by the final-state cotangent.
    b_cM = tl.zeros([BS, BP], tl.float32)
    b_cS = tl.zeros([BS, BP], tl.float32)
    if END_ADJOINT == 2:
        b_cM = tl.load(d_lam_t + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_cS = tl.load(d_eta_t + o_state, mask=m_sp, other=0.0).to(tl.float32)
    if END_ADJOINT == 1:
        # (λ, η) = (1/σ, μ/σ): dσ = −(ḡλ + ḡη·μ)·λ², dμ = ḡη·λ.
        b_lam = tl.load(lam_t + o_state, mask=m_sp, other=1.0)
        b_eta = tl.load(eta_t + o_state, mask=m_sp, other=0.0)
        b_glam = tl.load(d_lam_t + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_geta = tl.load(d_eta_t + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_cM = b_geta * b_lam
        b_cS = -(b_glam + b_geta * b_eta / b_lam) * b_lam * b_lam

    b_da = tl.zeros([BS, BP], tl.float32)
    b_dp = tl.zeros([BS, BP], tl.float32)
    # Scratch per program: the prior states of the SUB steps being reversed, then (SUB < CHUNK)
    # the state at each sub-block start of the current chunk.
    i_prog = i_nh.to(tl.int64) * N_PBLOCKS + i_p
    p_scr_sigma = scratch + i_prog * 2 * (SUB + CHUNK // SUB) * BS * BP
    p_scr_mu = p_scr_sigma + SUB * BS * BP
    p_sub = p_scr_mu + SUB * BS * BP
    o_scr = tl.multiple_of(o_s[:, None] * BP + tl.arange(0, BP)[None, :], [1, 1])  # see state_offsets
    n_chunks = tl.cdiv(eos - bos, CHUNK)
    for j in range(n_chunks - 1, -1, -1):
        t0 = bos + j * CHUNK
        slot = i_n + t0 // CHUNK
        o_ck = state_offsets(slot, i_h, o_p, o_s, H, P, S)
        b_sigma = tl.load(ck_sigma + o_ck, mask=m_sp, other=1.0)
        b_mu = tl.load(ck_mu + o_ck, mask=m_sp, other=0.0)
        n_steps = tl.minimum(CHUNK, eos - t0)
        if SUB < CHUNK:
            # Two-level replay: walk the chunk once parking only the sub-block start states,
            # so the per-step scratch below is SUB (not CHUNK) steps deep and stays in L2.
            _replay(v, lambda_v, k, q, t0, n_steps, b_sigma, b_mu, p_sub, p_sub + BS * BP, 2 * BS * BP, o_scr,
                    b_a, b_a2, b_noise, i_h, o_p, o_s, m_p, m_s, H, P, S, SUB, FAST_RCP)
        for jb in range(tl.cdiv(n_steps, SUB) - 1, -1, -1):
            tb = t0 + jb * SUB
            nb = tl.minimum(SUB, n_steps - jb * SUB)
            if SUB < CHUNK:
                b_sigma = tl.load(p_sub + jb * 2 * BS * BP + o_scr)
                b_mu = tl.load(p_sub + jb * 2 * BS * BP + BS * BP + o_scr)
            # Replay the sub-block, parking each step's prior state, then sweep it in reverse.
            _replay(v, lambda_v, k, q, tb, nb, b_sigma, b_mu, p_scr_sigma, p_scr_mu, BS * BP, o_scr,
                    b_a, b_a2, b_noise, i_h, o_p, o_s, m_p, m_s, H, P, S, 1, FAST_RCP)
            # Reverse sweep; the next (earlier) step's inputs, cotangents and parked state are
            # loaded one step ahead.
            n_v, n_lv, n_k, n_q, n_gy, n_gv, n_sp, n_mp = _load_reverse_step(
                v, lambda_v, k, q, d_y, d_yvar, p_scr_sigma, p_scr_mu, o_scr, tb, nb - 1,
                i_h, o_p, o_s, m_p, m_s, H, P, S, BS, BP, HAS_VAR)
            for ii in range(0, nb):
                i = nb - 1 - ii
                t = tb + i
                b_v, b_lv, b_k, b_q, b_gy, b_gv, b_sp, b_mp = n_v, n_lv, n_k, n_q, n_gy, n_gv, n_sp, n_mp
                n_v, n_lv, n_k, n_q, n_gy, n_gv, n_sp, n_mp = _load_reverse_step(
                    v, lambda_v, k, q, d_y, d_yvar, p_scr_sigma, p_scr_mu, o_scr, tb, tl.maximum(i - 1, 0),
                    i_h, o_p, o_s, m_p, m_s, H, P, S, BS, BP, HAS_VAR)
                o_tp = (t * H + i_h) * P + o_p
                b_gy, b_gv = b_gy.to(tl.float32), b_gv.to(tl.float32)
                b_phi, b_r = observation(b_v, b_lv, b_k)
                b_sigma, b_mu, b_iota = update_step(b_sp, b_mp, b_phi, b_r, b_a, b_a2, b_noise, FAST_RCP)
                b_q = b_q.to(tl.float32)
                b_M = b_q[:, None] * b_gy[None, :] + b_cM
                if HAS_VAR:
                    b_S = (b_q * b_q)[:, None] * b_gv[None, :] + b_cS
                else:
                    b_S = b_cS
                # P̄ = ι(ι·S̄ + (r − φ·μ_t)·M̄), with r − φ·μ_t = ι·(r − φ·a·μ_{t−1}): the second
                # form avoids cancelling r against φ·μ_t ≈ r when observations are sharp.
                b_innov = b_r - b_phi * b_a * b_mp
                b_P = b_iota * b_iota * (b_S + b_innov * b_M)
                b_cM = b_a * b_iota * b_M
                b_cS = b_a2 * b_P
                b_lv = b_lv.to(tl.float32)
                b_vlv = b_v.to(tl.float32) * b_lv
                b_kf = b_k.to(tl.float32)
                b_dphi = -b_sigma * (b_sigma * b_S + b_mu * b_M)
                b_dr = b_sigma * b_M
                b_da += 2.0 * b_a * b_sp * b_P + b_iota * b_mp * b_M
                b_dp += b_P
                b_dvlv = tl.sum(b_dr * b_kf[:, None], axis=0)
                b_dlv = tl.sum(b_dphi * (b_kf * b_kf)[:, None], axis=0) + b_v.to(tl.float32) * b_dvlv
                tl.store(d_v + o_tp, (b_lv * b_dvlv).to(d_v.dtype.element_ty), mask=m_p)
                tl.store(d_lv + o_tp, b_dlv.to(d_lv.dtype.element_ty), mask=m_p)
                # dk, dq sum over channels: within the program here, then either one partial
                # row per channel block ([N_PBLOCKS, tokens, H, S], summed outside) or atomics.
                b_dk = 2.0 * b_kf[:, None] * b_lv[None, :] * b_dphi + b_vlv[None, :] * b_dr
                b_dq = b_gy[None, :] * b_mu
                if HAS_VAR:
                    b_dq += 2.0 * b_q[:, None] * b_gv[None, :] * b_sigma
                o_ts = (t * H + i_h) * S
                if DETERMINISTIC or N_PBLOCKS == 1:
                    o_ts += i_p.to(tl.int64) * n_tokens * H * S
                if WARP_REDUCE:
                    lane = tl.arange(0, BP)
                    o_r, m_r = o_ts + (lane >> 1), ((lane & 1) == 0) & ((lane >> 1) < S)
                    _put(d_k + o_r, _warp_sum_16(b_dk, lane), m_r, ATOMIC)
                    _put(d_q + o_r, _warp_sum_16(b_dq, lane), m_r, ATOMIC)
                else:
                    _put(d_k + o_ts + o_s, tl.sum(b_dk, axis=1), m_s, ATOMIC)
                    _put(d_q + o_ts + o_s, tl.sum(b_dq, axis=1), m_s, ATOMIC)
            tl.debug_barrier()

    tl.store(d_a + o_state, b_da, mask=m_sp)
    tl.store(d_p + o_state, b_dp, mask=m_sp)
    if USE_INITIAL_STATE:
        b_lam = tl.load(lam0 + o_state, mask=m_sp, other=1.0).to(tl.float32)
        b_eta = tl.load(eta0 + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_s0 = 1.0 / b_lam
        b_m0 = b_eta * b_s0
        tl.store(d_lam0 + o_state, -b_s0 * (b_s0 * b_cS + b_m0 * b_cM), mask=m_sp)
        tl.store(d_eta0 + o_state, b_s0 * b_cM, mask=m_sp)


def block_sizes(P: int, S: int):
    """(BP channels, BS states, warps) of a program: one thread per channel."""
    BS = triton.next_power_of_2(S)
    BP = min(triton.next_power_of_2(P), MAX_CHANNELS)
    return BP, BS, max(1, BP // 32)


def _kq_for_kernel(k, q):
    """k, q upcast to fp32 once (if UPCAST_KQ): [B, L, H, S] is 1/P of the state, and the
    kernels then skip a bf16 → fp32 conversion of each value in every program's step."""
    return (k.float(), q.float()) if UPCAST_KQ else (k, q)


def checkpoint_slots(n_seq: int, n_tokens: int) -> int:
    """Rows of a forward checkpoint buffer: slot ``n + (bos_n + j·CHUNK) // CHUNK`` per chunk j
    of sequence n (module docstring)."""
    return n_seq + triton.cdiv(n_tokens, CHUNK)


def kla_fwd(v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens, output_final_state, save_checkpoints,
            output_variance=True):
    """Forward pass; without ``output_variance`` y_var is neither computed nor allocated (None)."""
    B, L, H, P = v.shape
    S = k.shape[-1]
    n_seq, T, cu, is_varlen = prepare_rows(v, cu_seqlens)
    a, p, lam0, eta0 = (to_kernel(x) for x in (a, p, lam0, eta0))
    k, q = _kq_for_kernel(k, q)
    y = torch.empty_like(v)
    y_var = torch.empty_like(v) if output_variance else None
    state_shape = (n_seq, H, S, P)
    lam_t = v.new_empty(state_shape, dtype=torch.float32) if output_final_state else y
    eta_t = v.new_empty(state_shape, dtype=torch.float32) if output_final_state else y
    ck_shape = (checkpoint_slots(n_seq, B * L), H, S, P) if save_checkpoints else (1,)
    ck_sigma = v.new_empty(ck_shape, dtype=torch.float32)
    ck_mu = v.new_empty(ck_shape, dtype=torch.float32)
    BP, BS, warps = block_sizes(P, S)
    grid = (n_seq * H, triton.cdiv(P, BP))
    _kla_fwd_kernel[grid](
        v, lambda_v, k, q, a, p,
        lam0 if lam0 is not None else y, eta0 if eta0 is not None else y,
        y, y if y_var is None else y_var, lam_t, eta_t, ck_sigma, ck_mu, cu,
        T, H=H, P=P, S=S, BP=BP, BS=BS, CHUNK=CHUNK,
        USE_INITIAL_STATE=lam0 is not None, STORE_FINAL_STATE=output_final_state,
        SAVE_CHECKPOINTS=save_checkpoints, IS_VARLEN=is_varlen, FAST_RCP=is_gpu_compiled(v),
        STORE_VAR=output_variance, num_warps=warps,
    )
    final = (from_kernel(lam_t), from_kernel(eta_t)) if output_final_state else None
    return y, y_var, final, (ck_sigma, ck_mu)


def kla_bwd(v, lambda_v, k, q, a, p, lam0, eta0, final, checkpoints, cu_seqlens,
            d_y, d_yvar, d_lam_t, d_eta_t, deterministic, end_adjoint=None):
    """Gradients of the scan. ``d_yvar`` None: y_var
    has no cotangent (not returned, or unused), and the kernel skips its terms.

    The end adjoint comes either as the cotangent ``(d_lam_t, d_eta_t)`` of the final state
    or, with ``end_adjoint`` ``[2, N, H, P, S]``, directly as the (μ, σ) adjoint.
    """
    B, L, H, P = v.shape
    S = k.shape[-1]
    n_seq, T, cu, is_varlen = prepare_rows(v, cu_seqlens)
    a_dtype, p_dtype, k_dtype, q_dtype = a.dtype, p.dtype, k.dtype, q.dtype
    a, p, lam0, eta0 = (to_kernel(x) for x in (a, p, lam0, eta0))
    k, q = _kq_for_kernel(k, q)
    BP, BS, warps = block_sizes(P, S)
    n_pblocks = triton.cdiv(P, BP)
    partial = deterministic or n_pblocks == 1
    f32 = dict(dtype=torch.float32, device=v.device)
    state_shape = (n_seq, H, S, P)
    dummy = torch.empty(1, **f32)
    dk_shape = (n_pblocks, B * L, H, S) if partial else (B * L, H, S)
    alloc = torch.empty if partial else torch.zeros
    d_k, d_q = alloc(dk_shape, **f32), alloc(dk_shape, **f32)
    d_v, d_lv = torch.empty_like(v), torch.empty_like(lambda_v)
    d_a, d_p = torch.empty(state_shape, **f32), torch.empty(state_shape, **f32)
    d_lam0 = torch.empty(state_shape, **f32) if lam0 is not None else dummy
    d_eta0 = torch.empty(state_shape, **f32) if lam0 is not None else dummy
    if end_adjoint is not None:
        mode, end_a, end_b = 2, to_kernel(end_adjoint[0]), to_kernel(end_adjoint[1])
    elif d_lam_t is not None or d_eta_t is not None:
        mode = 1
        lam_t, eta_t = map(to_kernel, final)  # the kernel reads the final state in this mode only
        end_a = torch.zeros_like(lam_t) if d_lam_t is None else to_kernel(d_lam_t)
        end_b = torch.zeros_like(eta_t) if d_eta_t is None else to_kernel(d_eta_t)
    else:
        mode, end_a, end_b = 0, dummy, dummy
    if mode != 1:
        lam_t = eta_t = dummy
    grid = (n_seq * H, n_pblocks)
    if BWD_SUBCHUNK and CHUNK % BWD_SUBCHUNK:
        raise ValueError(f"chunk.BWD_SUBCHUNK must divide CHUNK={CHUNK} (or be 0), got {BWD_SUBCHUNK}")
    sub = BWD_SUBCHUNK or CHUNK
    scratch = torch.empty(grid[0] * grid[1] * 2 * (sub + CHUNK // sub) * BS * BP, **f32)
    _kla_bwd_kernel[grid](
        v, lambda_v, k, q, a, p,
        lam0 if lam0 is not None else dummy, eta0 if eta0 is not None else dummy, lam_t, eta_t,
        checkpoints[0], checkpoints[1], cu, scratch,
        d_y, d_y if d_yvar is None else d_yvar, end_a, end_b,
        d_v, d_lv, d_k, d_q, d_a, d_p, d_lam0, d_eta0,
        T, B * L, H=H, P=P, S=S, BP=BP, BS=BS, CHUNK=CHUNK,
        USE_INITIAL_STATE=lam0 is not None, END_ADJOINT=mode,
        IS_VARLEN=is_varlen, DETERMINISTIC=deterministic, N_PBLOCKS=n_pblocks,
        FAST_RCP=is_gpu_compiled(v), WARP_REDUCE=is_gpu_compiled(v) and WARP_REDUCE and BS == 16 and BP == 32,
        SUB=sub, HAS_VAR=d_yvar is not None, num_warps=warps,
    )
    if partial:
        d_k, d_q = (d_k[0], d_q[0]) if n_pblocks == 1 else (d_k.sum(0), d_q.sum(0))
    d_k = d_k.view(B, L, H, S).to(k_dtype)
    d_q = d_q.view(B, L, H, S).to(q_dtype)
    d_a = from_kernel(d_a.sum(0)).to(a_dtype)
    d_p = from_kernel(d_p.sum(0)).to(p_dtype)
    d_state = (from_kernel(d_lam0), from_kernel(d_eta0)) if lam0 is not None else (None, None)
    return d_v, d_lv, d_k, d_q, d_a, d_p, *d_state
