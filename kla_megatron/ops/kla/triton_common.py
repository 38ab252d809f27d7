"""Building blocks shared by the Triton scan kernels (``chunk.py`` training kernels,
``chunk_carry.py`` transforms and adjoint maps, ``fused_recurrent.py`` decode): the lane layout,
per-token loads, the information-form filter step in covariance form, and the host-side
layout helpers. docs/kla.md#triton-training-kernels describes the layout.

Kernel naming: ``b_`` block values, ``n_`` prefetched next-token values, ``p_`` pointers,
``o_`` offsets, ``m_`` masks, ``i_`` program ids.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def seq_bounds(cu_seqlens, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, eos


@triton.jit
def channel_lanes(i_p, P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr):
    """Channel and state offsets/masks of one program's [BS states, BP channels] block."""
    o_p = i_p * BP + tl.arange(0, BP)
    o_s = tl.arange(0, BS)
    m_p, m_s = o_p < P, o_s < S
    return o_p, o_s, m_p, m_s, m_s[:, None] & m_p[None, :]


@triton.jit
def state_offsets(i_n, i_h, o_p, o_s, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    """Offsets of the lane block in a state-major ``[N, H, S, P]`` tensor (see ``to_kernel``).

    Declared unaligned on purpose: otherwise Triton's coalescing pass vectorises these
    (rare) state loads and stores four channels per thread and, to match, spreads the
    states of a channel over threads and warps, turning every per-step read-out over S
    into shuffles and barriers. One channel per thread keeps the hot loop in registers.
    """
    o = ((i_n * H + i_h) * S + o_s[:, None]) * P + o_p[None, :]
    return tl.multiple_of(o, [1, 1])


@triton.jit
def load_dynamics(a, p, i_h, o_p, o_s, m_sp, H: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    """(a, a², p) of the lane block; padding lanes get a = 1, p = 0 (no NaN anywhere)."""
    o = state_offsets(0, i_h, o_p, o_s, H, P, S)
    b_a = tl.load(a + o, mask=m_sp, other=1.0).to(tl.float32)
    b_noise = tl.load(p + o, mask=m_sp, other=0.0).to(tl.float32)
    return b_a, b_a * b_a, b_noise


@triton.jit
def load_token(v, lambda_v, k, q, t, i_h, o_p, o_s, m_p, m_s,
                H: tl.constexpr, P: tl.constexpr, S: tl.constexpr):
    """Raw inputs of token t: v, Λv [BP]; k, q [BS]. Prefetches past the end of a sequence
    or chunk clamp t instead of masking it, so no per-token mask keeps the k, q loads from
    being vectorised."""
    o_tp = (t * H + i_h) * P + o_p
    o_ts = (t * H + i_h) * S + o_s
    b_v = tl.load(v + o_tp, mask=m_p, other=0.0)
    b_lv = tl.load(lambda_v + o_tp, mask=m_p, other=0.0)
    b_k = tl.load(k + o_ts, mask=m_s, other=0.0)
    b_q = tl.load(q + o_ts, mask=m_s, other=0.0)
    return b_v, b_lv, b_k, b_q


@triton.jit
def observation(b_v, b_lv, b_k):
    """φ = Λv·k² and r = v·Λv·k for the lane block [BS, BP] (inputs upcast to fp32)."""
    b_v, b_lv, b_k = b_v.to(tl.float32), b_lv.to(tl.float32), b_k.to(tl.float32)
    return (b_k * b_k)[:, None] * b_lv[None, :], b_k[:, None] * (b_v * b_lv)[None, :]


@triton.jit
def rcp(x, FAST_RCP: tl.constexpr):
    """1/x. On the GPU the hardware approximate reciprocal (≤ 1 ulp, as accurate as Triton's
    default division): callers pass x ≥ 1, which needs none of the division's range fix-ups."""
    if FAST_RCP:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def update_step(b_sigma, b_mu, b_phi, b_r, b_a, b_a2, b_noise, FAST_RCP: tl.constexpr):
    """One covariance-form step (docs/kla.md#sequential-forms): returns posterior (σ, μ) and the gain ι."""
    b_prior = b_a2 * b_sigma + b_noise
    b_iota = rcp(1.0 + b_phi * b_prior, FAST_RCP)
    return b_prior * b_iota, (b_a * b_mu + b_r * b_prior) * b_iota, b_iota


def is_gpu_compiled(x) -> bool:
    """Kernels on ``x`` are compiled for a GPU: the inline-PTX paths (reciprocal, warp
    shuffles) are allowed; the interpreter cannot run them."""
    return x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"


def to_kernel(x):
    """``[..., P, S]`` → the kernels' state-major ``[..., S, P]`` (channels contiguous, so a
    thread's states load and store coalesced across the warp); ``None`` passes through."""
    return None if x is None else x.transpose(-1, -2).contiguous()


def from_kernel(x):
    """Inverse of :func:`to_kernel`."""
    return x.transpose(-1, -2).contiguous()


def prepare_rows(v, cu_seqlens):
    """Flatten rows into one token axis; returns (n_seq, T per row or 0, cu_seqlens or dummy)."""
    B, L = v.shape[:2]
    if cu_seqlens is None:
        return B, L, v.new_empty(1, dtype=torch.int32), False
    return cu_seqlens.numel() - 1, 0, cu_seqlens.to(device=v.device, dtype=torch.int32).contiguous(), True
