"""Triton causal depthwise conv1d (+ SiLU) with an exact backward, as ``torch.library`` custom
ops (namespace ``kla_conv``) so that ``torch.compile(fullgraph=True)`` and CUDA graphs see them.

Shapes: x ``[B, L, M]`` (any strides with ``x.stride(-1) == 1``: read in place), weight
``[M, K]`` with K ≤ MAX_K, bias ``[M]``, window ``[B, M, K-1]`` (the K-1 inputs before x, oldest
first), position_in_doc ``[L]`` int; y ``[B, L, M]`` contiguous in x's dtype. With
xx = [window | x], all in fp32:

    u[t]  = bias + Σ_{j<K} weight[:, K-1-j] · xx[t-j] · [j ≤ pos[t]]
    y[t]  = silu(u[t]) or u[t]
    du[t] = dy[t] · silu'(u[t]) (or dy[t]);   dxx[t] = Σ_{j<K} weight[:, K-1-j] · [j ≤ pos[t+j]] · du[t+j]

A program walks TS tokens of BM channels of one batch row (a thread holds 16 bytes of
channels), so the K-1 neighbours a token needs are registers carried from the previous
step, never a second load or a recomputation: x is read once, y (dx) written once. Tokens
arrive ROWS per load, the next ROWS in flight while the current ones are computed (a walk of
one-token loads would wait on memory at every step).

1. ``_conv_fwd_kernel`` walks forward carrying x[t-1..t-3].
2. ``_conv_bwd_kernel`` walks backward carrying x[t..t-2] and du[t+1..t+3]: du[t] once per
   token (the pre-activation recomputed from x: only the inputs are saved), dx[t], and at the
   first segment of a row the window's gradient (tokens -1..1-K, which context parallelism
   sends back to the previous rank). A segment starts K-1 tokens late (their du feeds its last
   dx). dweight and dbias are summed in registers over the segment into fp32 partials
   ``[B·segments, K, M]``, ``[B·segments, M]`` that torch sums afterwards (deterministic, no
   atomics).

Nothing here reads device values on the host, so forward and backward capture in CUDA graphs.
Kernel naming (as in ``ops/kla/chunk.py``): ``b_`` block values, ``p_`` pointers, ``o_``
offsets, ``m_`` masks, ``i_`` program ids, ``n_`` prefetched values.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_K = 4  # taps the kernels keep in registers (Mamba's and the mixer's conv width)
# Block sizes: module attributes so tests (small blocks in the interpreter) and
# bench/bench_conv.py (--sweep) can change them. BM: at most this many channels per program
# (also at most 16 bytes per thread: 256 bf16 or 128 fp32 channels a warp); TS tokens per
# program; ROWS tokens per load (in flight together; a power of 2 ≥ MAX_K - 1). Chosen from
# compiled sm_90 register counts (bf16: forward ~130, backward ~240 registers, no spills
# without documents), not yet timed on a GPU.
FWD_BM, FWD_TS, FWD_ROWS, FWD_WARPS = 256, 64, 4, 1
BWD_BM, BWD_TS, BWD_ROWS, BWD_WARPS = 256, 64, 4, 1


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _load_rows(row, t_lo, s_t, o_m, M, L, ROWS: tl.constexpr):
    """Tokens ``t_lo + [0, ROWS)`` of one row ``[L, M]`` (``s_t`` apart) as ``[ROWS, BM]`` in the
    input dtype, zero outside [0, L). Per-element offsets are int32; the tile base is 64-bit."""
    o_r = tl.arange(0, ROWS)
    o_t = t_lo + o_r
    p = row + tl.cast(t_lo, tl.int64) * s_t + (o_r[:, None] * s_t + o_m[None, :])
    return tl.load(p, mask=((o_t >= 0) & (o_t < L))[:, None] & (o_m < M)[None, :], other=0.0)


@triton.jit
def _load_x_rows(x_row, win_row, t_lo, s_xt, o_m, M, L, K: tl.constexpr, ROWS: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    """xx = [window | x] at tokens ``t_lo + [0, ROWS)``; ``win_row`` is the window ``[K-1, M]``
    (tokens 1-K .. -1) of this batch row, laid out like x so both loads share one layout."""
    b_x = _load_rows(x_row, t_lo, s_xt, o_m, M, L, ROWS)
    if HAS_WINDOW:
        if t_lo < 0:  # only the first rows of a batch row pay for the window's loads
            b_x += _load_rows(win_row, t_lo + (K - 1), M, o_m, M, K - 1, ROWS)
    return b_x


@triton.jit
def _row(tile, r: tl.constexpr, ROWS: tl.constexpr):
    """Row ``r`` of a ``[ROWS, BM]`` tile as fp32 ``[BM]`` (a register pick: the launchers choose
    BM and warps so that each thread holds all ROWS rows of its channels)."""
    return tl.sum(tl.where(tl.arange(0, ROWS)[:, None] == r, tile, 0.0), 0).to(tl.float32)


@triton.jit
def _load_pos(pos, t, L):
    """Position of token ``t`` (a scalar) in its document; 0 outside [0, L)."""
    return tl.load(pos + t, mask=(t >= 0) & (t < L), other=0).to(tl.int32)


@triton.jit
def _load_tap(weight_t, o_m, M, K: tl.constexpr, j: tl.constexpr):
    """Weight of lag ``j`` (row K-1-j of the fp32 ``[K, M]`` transposed weight) as ``[BM]``;
    zero for j ≥ K."""
    if j < K:
        return tl.load(weight_t + (K - 1 - j) * M + o_m, mask=o_m < M, other=0.0).to(tl.float32)
    return tl.zeros(o_m.shape, dtype=tl.float32)


@triton.jit
def _load_bias(bias, o_m, M, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        return tl.load(bias + o_m, mask=o_m < M, other=0.0).to(tl.float32)
    return tl.zeros(o_m.shape, dtype=tl.float32)


@triton.jit
def _conv_fwd_kernel(x, window, weight, bias, pos, y, L, M, s_xb, s_xt,
                     K: tl.constexpr, BM: tl.constexpr, TS: tl.constexpr, ROWS: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DOC: tl.constexpr,
                     SILU: tl.constexpr):
    """Walks tokens [t0, t0+TS) of BM channels of one batch row, ROWS tokens per load (the next
    ROWS in flight meanwhile); x1..x3 carry x[t-1..t-3]."""
    i_s, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    x_row, win_row, y_row = x + i_b * s_xb, window + i_b * (K - 1) * M, y + i_b * L * M
    w0, w1 = _load_tap(weight, o_m, M, K, 0), _load_tap(weight, o_m, M, K, 1)
    w2, w3 = _load_tap(weight, o_m, M, K, 2), _load_tap(weight, o_m, M, K, 3)
    b_bias = _load_bias(bias, o_m, M, HAS_BIAS)
    t0 = i_s * TS
    b_hist = _load_x_rows(x_row, win_row, t0 - ROWS, s_xt, o_m, M, L, K, ROWS, HAS_WINDOW)
    x1, x2, x3 = _row(b_hist, ROWS - 1, ROWS), _row(b_hist, ROWS - 2, ROWS), _row(b_hist, ROWS - 3, ROWS)
    n_x = _load_rows(x_row, t0, s_xt, o_m, M, L, ROWS)
    for c in range(0, tl.cdiv(tl.minimum(TS, L - t0), ROWS)):
        b_x, t_lo = n_x, t0 + c * ROWS
        n_x = _load_rows(x_row, t_lo + ROWS, s_xt, o_m, M, L, ROWS)
        for r in tl.static_range(ROWS):
            t = t_lo + r
            x0, h1, h2, h3 = _row(b_x, r, ROWS), x1, x2, x3
            if HAS_DOC:  # taps reaching before t's document read zero
                p = _load_pos(pos, t, L)
                h1, h2, h3 = tl.where(p >= 1, x1, 0.0), tl.where(p >= 2, x2, 0.0), tl.where(p >= 3, x3, 0.0)
            b_y = b_bias + w0 * x0 + w1 * h1 + w2 * h2 + w3 * h3
            if SILU:
                b_y = b_y / (1.0 + tl.exp(-b_y))
            # o_m < (M or 0): the interpreter rejects vector & scalar masks
            tl.store(y_row + tl.cast(t, tl.int64) * M + o_m, b_y.to(y.dtype.element_ty),
                     mask=o_m < tl.where(t < L, M, 0))
            x3, x2, x1 = x2, x1, x0


@triton.jit
def _conv_bwd_kernel(x, window, weight, bias, pos, dy, dx, d_window, dw_part, db_part, L, M,
                     s_xb, s_xt, s_db, s_dt, n_seg, K: tl.constexpr, BM: tl.constexpr, TS: tl.constexpr,
                     ROWS: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_BIAS: tl.constexpr,
                     HAS_DOC: tl.constexpr, SILU: tl.constexpr):
    """Walks tokens t1+K-2 down to t0 (down to 1-K, the window's tokens, in the first segment):
    du[t] once per token, dx[t] from du[t..t+3] (du1..du3 carried), dweight and dbias summed
    in registers over [t0, t1); x[t-3] and dy[t] arrive ROWS tokens per load. ``pos`` is read
    only with HAS_DOC (a dummy pointer otherwise)."""
    i_s, i_m, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    o_m = i_m * BM + tl.arange(0, BM)
    m_m = o_m < M
    x_row, win_row, dy_row = x + i_b * s_xb, window + i_b * (K - 1) * M, dy + i_b * s_db
    dx_row, dwin_row = dx + i_b * L * M, d_window + i_b * (K - 1) * M
    t0 = i_s * TS
    t1 = tl.minimum(t0 + TS, L)
    hi = tl.minimum(t1 + K - 2, L - 1)  # du of the next K-1 tokens feeds this segment's last dx
    lo = t0
    if HAS_WINDOW:
        if i_s == 0:
            lo = 1 - K
    b_hist = _load_x_rows(x_row, win_row, hi - ROWS + 1, s_xt, o_m, M, L, K, ROWS, HAS_WINDOW)
    xa, xb, xc = _row(b_hist, ROWS - 1, ROWS), _row(b_hist, ROWS - 2, ROWS), _row(b_hist, ROWS - 3, ROWS)
    du1 = tl.zeros([BM], dtype=tl.float32)  # du[t+1..t+3], their positions p1..p3
    du2, du3, dw0, dw1, dw2, dw3, b_db = du1, du1, du1, du1, du1, du1, du1
    p1, p2, p3 = hi * 0, hi * 0, hi * 0
    if HAS_DOC:
        p1, p2, p3 = _load_pos(pos, hi + 1, L), _load_pos(pos, hi + 2, L), _load_pos(pos, hi + 3, L)
    n_x = _load_x_rows(x_row, win_row, hi - 3 - (ROWS - 1), s_xt, o_m, M, L, K, ROWS, HAS_WINDOW)
    n_g = _load_rows(dy_row, hi - (ROWS - 1), s_dt, o_m, M, L, ROWS)
    for c in range(0, tl.cdiv(hi - lo + 1, ROWS)):
        b_x, b_g, t_hi = n_x, n_g, hi - c * ROWS  # rows: x[t-3], dy[t] for t = t_hi-ROWS+1 .. t_hi
        n_x = _load_x_rows(x_row, win_row, t_hi - 3 - (2 * ROWS - 1), s_xt, o_m, M, L, K, ROWS, HAS_WINDOW)
        n_g = _load_rows(dy_row, t_hi - (2 * ROWS - 1), s_dt, o_m, M, L, ROWS)
        # Taps and bias reloaded per chunk (L1 hits): registers for the in-flight rows instead.
        w0, w1 = _load_tap(weight, o_m, M, K, 0), _load_tap(weight, o_m, M, K, 1)
        w2, w3 = _load_tap(weight, o_m, M, K, 2), _load_tap(weight, o_m, M, K, 3)
        b_bias = _load_bias(bias, o_m, M, HAS_BIAS)
        for k in tl.static_range(ROWS):
            t = t_hi - k
            xd, du0 = _row(b_x, ROWS - 1 - k, ROWS), _row(b_g, ROWS - 1 - k, ROWS)  # du0 = dy (0 for t < 0)
            h1, h2, h3, g1, g2, g3 = xb, xc, xd, du1, du2, du3
            if HAS_DOC:  # the taps u[t] reads, and du[t+j] only where t is in t+j's document
                p = _load_pos(pos, t, L)
                h1, h2, h3 = tl.where(p >= 1, xb, 0.0), tl.where(p >= 2, xc, 0.0), tl.where(p >= 3, xd, 0.0)
                g1, g2, g3 = tl.where(p1 >= 1, du1, 0.0), tl.where(p2 >= 2, du2, 0.0), tl.where(p3 >= 3, du3, 0.0)
                p3, p2, p1 = p2, p1, p
            if SILU:
                b_u = b_bias + w0 * xa + w1 * h1 + w2 * h2 + w3 * h3
                b_sig = 1.0 / (1.0 + tl.exp(-b_u))
                du0 = du0 * b_sig * (1.0 + b_u * (1.0 - b_sig))
            b_dx = w0 * du0 + w1 * g1 + w2 * g2 + w3 * g3
            if (t >= t0) & (t < t1):
                tl.store(dx_row + tl.cast(t, tl.int64) * M + o_m, b_dx.to(dx.dtype.element_ty), mask=m_m)
                dw0 += du0 * xa
                dw1 += du0 * h1
                dw2 += du0 * h2
                dw3 += du0 * h3
                b_db += du0
            if HAS_WINDOW:
                if (t < 0) & (t >= 1 - K):
                    p_w = dwin_row + tl.cast(t + K - 1, tl.int64) * M + o_m
                    tl.store(p_w, b_dx.to(d_window.dtype.element_ty), mask=m_m)
            du3, du2, du1 = du2, du1, du0
            xa, xb, xc = xb, xc, xd
    p_dw = dw_part + ((i_b * n_seg + i_s) * K + K - 1) * M + o_m  # column K-1-j holds lag j
    tl.store(p_dw, dw0, mask=m_m)
    if K > 1:
        tl.store(p_dw - M, dw1, mask=m_m)
    if K > 2:
        tl.store(p_dw - 2 * M, dw2, mask=m_m)
    if K > 3:
        tl.store(p_dw - 3 * M, dw3, mask=m_m)
    if HAS_BIAS:
        tl.store(db_part + (i_b * n_seg + i_s) * M + o_m, b_db, mask=m_m)


# ----------------------------------------------------------------------------- launchers


def _unit_stride(t: Tensor) -> Tensor:
    """Channels must be contiguous; anything else strided is read in place."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _flags(weight, bias, window, position_in_doc, silu):
    return dict(K=weight.shape[-1], HAS_WINDOW=window is not None, HAS_BIAS=bias is not None,
                HAS_DOC=position_in_doc is not None, SILU=silu)


def _operands(x, weight, bias, window, position_in_doc):
    """Kernel-ready operands; an absent tensor becomes a dummy pointer (its flag is off)."""
    M, K = x.shape[-1], weight.shape[-1]
    x = _unit_stride(x)
    weight = weight.reshape(M, K).t().float().contiguous()  # [K, M]: a tap's channels contiguous
    # [B, K-1, M]: the window's tokens laid out like x's (a tiny copy)
    window = window.transpose(1, 2).to(x.dtype).contiguous() if window is not None else weight
    pos = position_in_doc.contiguous() if position_in_doc is not None else weight
    return x, weight, bias if bias is not None else weight, window, pos


def _blocks(BM: int, warps: int, M: int, x: Tensor):
    """(BM, warps): one 16-byte vector of channels per thread (more would add registers, not
    bandwidth), and every thread holding all ROWS rows of its channels (a warp may not straddle
    rows: then a row pick would cross threads)."""
    vec = 16 // x.element_size()
    BM = min(BM, 32 * vec * warps, triton.next_power_of_2(M))
    return BM, max(1, min(warps, BM // (32 * vec)))


def conv_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], window: Optional[Tensor],
             position_in_doc: Optional[Tensor], silu: bool) -> Tensor:
    """y ``[B, L, M]`` (contiguous, x's dtype); ``window`` None or ``[B, M, K-1]`` with K > 1."""
    B, L, M = x.shape
    flags = _flags(weight, bias, window, position_in_doc, silu)
    x, w, b, win, pos = _operands(x, weight, bias, window, position_in_doc)
    y = x.new_empty((B, L, M))
    BM, warps = _blocks(FWD_BM, FWD_WARPS, M, x)
    grid = (triton.cdiv(L, FWD_TS), triton.cdiv(M, BM), B)
    _conv_fwd_kernel[grid](x, win, w, b, pos, y, L, M, x.stride(0), x.stride(1), BM=BM, TS=FWD_TS,
                           ROWS=FWD_ROWS, num_warps=warps, **flags)
    return y


def conv_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], window: Optional[Tensor],
             position_in_doc: Optional[Tensor], silu: bool):
    """(dx ``[B, L, M]``, dweight (weight's shape), dbias or None, dwindow or None), each
    contiguous in its input's dtype."""
    B, L, M = x.shape
    K = weight.shape[-1]
    flags = _flags(weight, bias, window, position_in_doc, silu)
    dy = _unit_stride(dy)
    x, w, b, win, pos = _operands(x, weight, bias, window, position_in_doc)
    (BM, warps), n_seg = _blocks(BWD_BM, BWD_WARPS, M, x), triton.cdiv(L, BWD_TS)
    dx = x.new_empty((B, L, M))
    d_window = window.new_empty((B, K - 1, M)) if window is not None else dx
    dw_part = x.new_empty((B * n_seg, K, M), dtype=torch.float32)
    db_part = x.new_empty((B * n_seg, M), dtype=torch.float32) if bias is not None else dw_part
    _conv_bwd_kernel[(n_seg, triton.cdiv(M, BM), B)](
        x, win, w, b, pos, dy, dx, d_window, dw_part, db_part, L, M, x.stride(0), x.stride(1),
        dy.stride(0), dy.stride(1), n_seg, BM=BM, TS=BWD_TS, ROWS=BWD_ROWS, num_warps=warps, **flags,
    )
    dweight = dw_part.sum(0).t().reshape(weight.shape).to(weight.dtype).contiguous()
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias, d_window.transpose(1, 2).contiguous() if window is not None else None


# ----------------------------------------------------------------------------- custom ops


def _empty(like: Tensor) -> Tensor:
    """Stand-in for an absent gradient (op schemas cannot return None)."""
    return like.new_empty(0)


@torch.library.custom_op("kla_conv::fwd", mutates_args=())
def _fwd_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], window: Optional[Tensor],
            position_in_doc: Optional[Tensor], silu: bool) -> Tensor:
    return conv_fwd(x, weight, bias, window, position_in_doc, silu)


@_fwd_op.register_fake
def _(x, weight, bias, window, position_in_doc, silu):
    return x.new_empty(x.shape)


@torch.library.custom_op("kla_conv::bwd", mutates_args=())
def _bwd_op(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], window: Optional[Tensor],
            position_in_doc: Optional[Tensor], silu: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dwindow); the last two empty when bias / window are None."""
    dx, dweight, dbias, d_window = conv_bwd(dy, x, weight, bias, window, position_in_doc, silu)
    return dx, dweight, _empty(x) if dbias is None else dbias, _empty(x) if d_window is None else d_window


@_bwd_op.register_fake
def _(dy, x, weight, bias, window, position_in_doc, silu):
    return (x.new_empty(x.shape), weight.new_empty(weight.shape),
            _empty(x) if bias is None else bias.new_empty(bias.shape),
            _empty(x) if window is None else window.new_empty(window.shape))


def _setup(ctx, inputs, output):
    x, weight, bias, window, position_in_doc, silu = inputs
    ctx.silu = silu
    # Inputs only: the backward recomputes the pre-activation instead of keeping y.
    ctx.save_for_backward(x, weight, bias, window, position_in_doc)


def _backward(ctx, dy):
    x, weight, bias, window, position_in_doc = ctx.saved_tensors
    dx, dweight, dbias, d_window = torch.ops.kla_conv.bwd(dy, x, weight, bias, window, position_in_doc, ctx.silu)
    return (dx, dweight, dbias if bias is not None else None, d_window if window is not None else None,
            None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup)


def triton_causal_conv1d(x, weight, bias=None, *, window=None, position_in_doc=None, activation=None):
    """Triton backend of :func:`kla_megatron.ops.conv.causal_conv1d` (inputs already checked)."""
    from ..kla_core import new_window

    K = weight.shape[-1]
    if x.dtype == torch.float64:
        raise ValueError("causal_conv1d: the Triton backend computes in fp32; use backend='torch' for float64")
    if K > MAX_K:
        raise ValueError(f"causal_conv1d: the Triton kernels hold at most {MAX_K} taps, got K={K}; "
                         "use backend='torch'")
    kernel_window = window if K > 1 else None  # [B, M, 0]: nothing to read
    y = torch.ops.kla_conv.fwd(x, weight, bias, kernel_window, position_in_doc, activation == "silu")
    return y, new_window(x, window, K)
