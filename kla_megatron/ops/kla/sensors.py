"""The sensor activations of a KLA layer (docs/kla.md#layer), fused: one pass in, one pass out.

The mixer's block-diagonal sensor projection emits, per token and head, ``[v | log σ²_v | k | q]``
(widths P, P, S, S: the "plain" preset). The scan needs

    Λv = 1/(softplus(log σ²_v) + OBS_VAR_MIN)        k̂ = k/max(‖k‖, L2_EPS)    q̂ likewise

(``torch_sensor_activations`` in ``ops/kla_core.py``, the definition these kernels are tested against).
Written as PyTorch ops this is a dozen elementwise kernels with fp32 copies of every
per-token tensor kept for backward. :func:`sensor_activations` does it in one Triton kernel
each way and keeps only the raw ``[log σ²_v | k | q]`` (in the I/O dtype) for the backward, which
recomputes the activations in fp32 and writes the gradient of the whole projection output
in one buffer. It also reads the projection in the head-major layout ``[H, B, L, O]`` that a
batched matmul over heads produces, so no permute copy sits between the two.

Shapes: ``sens`` ``[H, B, L, O]`` with O = 2P + 2S; outputs ``v``, ``lambda_v``
``[B, L, H, P]`` and ``k``, ``q`` ``[B, L, H, S]``, all in ``sens``' dtype (bf16 I/O; the scan
keeps its state in fp32).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ..kla_core import L2_EPS, OBS_VAR_MIN, torch_sensor_activations

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton is Linux-only; the PyTorch path serves elsewhere
    triton = None


def _split(sens: Tensor, S: int):
    P = (sens.shape[-1] - 2 * S) // 2
    v, log_var, k, q = sens.split([P, P, S, S], dim=-1)
    return tuple(x.permute(1, 2, 0, 3) for x in (v, log_var, k, q))  # [H, B, L, w] -> [B, L, H, w]


def _check(sens: Tensor, S: int) -> int:
    if sens.dim() != 4:
        raise ValueError(f"sensor_activations: `sens` must be [H, B, L, 2P+2S], got shape {tuple(sens.shape)}")
    O = sens.shape[-1]
    if O <= 2 * S or (O - 2 * S) % 2:
        raise ValueError(f"sensor_activations: last dim {O} of `sens` is not 2P + 2S with d_state S={S}")
    return (O - 2 * S) // 2


def use_triton(backend: str, x: Tensor) -> bool:
    """Whether a fused glue op runs its Triton kernels: ``backend`` as in ``kla_scan`` ("auto":
    on CUDA; "triton": also on the CPU through ``TRITON_INTERPRET=1``; "torch"/"naive"/"recurrent":
    never).
    float64 always takes the PyTorch form."""
    if backend not in ("auto", "triton", "torch", "naive", "recurrent"):
        raise ValueError(f"unknown backend {backend!r}; choose 'auto', 'triton', 'torch', 'naive' or 'recurrent'")
    if x.dtype == torch.float64 or triton is None or backend in ("torch", "naive", "recurrent"):
        return False
    return backend == "triton" or x.is_cuda


def sensor_activations(sens: Tensor, d_state: int, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(v, Λv, k̂, q̂)`` from the head-major projection ``sens`` ``[H, B, L, 2P+2S]`` (module
    docstring); ``backend`` as in :func:`use_triton`."""
    _check(sens, d_state)
    if not use_triton(backend, sens):
        return tuple(x.contiguous() for x in torch_sensor_activations(*_split(sens, d_state)))
    return tuple(torch.ops.kla.sensors_fwd(sens.contiguous(), d_state)[:4])


# ----------------------------------------------------------------------------- kernels

if triton is not None:

    @triton.jit
    def _rows(i_r, n_rows, N, H, BR: tl.constexpr):
        """Rows (head h, token n) of this program: source offset r and target row n·H + h."""
        o_r = i_r * BR + tl.arange(0, BR)
        m_r = o_r < n_rows
        o_h, o_n = o_r // N, o_r % N
        return o_r.to(tl.int64), (o_n * H + o_h).to(tl.int64), m_r

    @triton.jit
    def _softplus(x):
        """log(1 + eˣ) = max(x, 0) + log1p(e^−|x|), with log1p(e) = log(u)·e/(u − 1), u = 1 + e
        (Goldberg's trick: accurate where e is below fp32's epsilon next to 1)."""
        e = tl.exp(-tl.abs(x))
        u = 1.0 + e
        log1p = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
        return tl.maximum(x, 0.0) + log1p

    @triton.jit
    def _sensors_fwd_kernel(sens, v, lambda_v, k, q, raw, n_rows, N, H, P: tl.constexpr, S: tl.constexpr,
                            BP: tl.constexpr, BS: tl.constexpr, BR: tl.constexpr,
                            OBS_VAR_MIN: tl.constexpr, L2_EPS: tl.constexpr):
        O: tl.constexpr = 2 * P + 2 * S
        R: tl.constexpr = P + 2 * S  # raw copy kept for backward: [log σ²_v | k | q]
        o_src, o_dst, m_r = _rows(tl.program_id(0), n_rows, N, H, BR)
        o_p, o_s = tl.arange(0, BP), tl.arange(0, BS)
        m_rp = m_r[:, None] & (o_p < P)[None, :]
        m_rs = m_r[:, None] & (o_s < S)[None, :]
        p_row = sens + o_src[:, None] * O
        b_v = tl.load(p_row + o_p[None, :], mask=m_rp, other=0.0)
        b_lv = tl.load(p_row + P + o_p[None, :], mask=m_rp, other=0.0)
        b_k = tl.load(p_row + 2 * P + o_s[None, :], mask=m_rs, other=0.0)
        b_q = tl.load(p_row + 2 * P + S + o_s[None, :], mask=m_rs, other=0.0)
        p_raw = raw + o_dst[:, None] * R
        tl.store(p_raw + o_p[None, :], b_lv, mask=m_rp)
        tl.store(p_raw + P + o_s[None, :], b_k, mask=m_rs)
        tl.store(p_raw + P + S + o_s[None, :], b_q, mask=m_rs)

        x = b_lv.to(tl.float32)
        softplus = _softplus(x)
        kf, qf = b_k.to(tl.float32), b_q.to(tl.float32)
        k_rn = 1.0 / tl.maximum(tl.sqrt(tl.sum(kf * kf, axis=1)), L2_EPS)
        q_rn = 1.0 / tl.maximum(tl.sqrt(tl.sum(qf * qf, axis=1)), L2_EPS)
        dt = v.dtype.element_ty
        tl.store(v + o_dst[:, None] * P + o_p[None, :], b_v, mask=m_rp)
        tl.store(lambda_v + o_dst[:, None] * P + o_p[None, :], (1.0 / (softplus + OBS_VAR_MIN)).to(dt), mask=m_rp)
        tl.store(k + o_dst[:, None] * S + o_s[None, :], (kf * k_rn[:, None]).to(dt), mask=m_rs)
        tl.store(q + o_dst[:, None] * S + o_s[None, :], (qf * q_rn[:, None]).to(dt), mask=m_rs)

    @triton.jit
    def _normalize_bwd(b_raw, b_grad, L2_EPS: tl.constexpr):
        """d raw of x̂ = x/max(‖x‖, eps): (ĝ − x̂(x̂·ĝ))/‖x‖, or ĝ/eps where the floor holds."""
        n = tl.sqrt(tl.sum(b_raw * b_raw, axis=1))
        floored = n <= L2_EPS
        rn = 1.0 / tl.maximum(n, L2_EPS)
        xh = b_raw * rn[:, None]
        proj = tl.where(floored, 0.0, tl.sum(xh * b_grad, axis=1))
        return (b_grad - xh * proj[:, None]) * rn[:, None]

    @triton.jit
    def _sensors_bwd_kernel(raw, d_v, d_lambda_v, d_k, d_q, d_sens, n_rows, N, H,
                            P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
                            BR: tl.constexpr, OBS_VAR_MIN: tl.constexpr, L2_EPS: tl.constexpr):
        O: tl.constexpr = 2 * P + 2 * S
        R: tl.constexpr = P + 2 * S
        o_src, o_dst, m_r = _rows(tl.program_id(0), n_rows, N, H, BR)
        o_p, o_s = tl.arange(0, BP), tl.arange(0, BS)
        m_rp = m_r[:, None] & (o_p < P)[None, :]
        m_rs = m_r[:, None] & (o_s < S)[None, :]
        p_raw = raw + o_dst[:, None] * R
        x = tl.load(p_raw + o_p[None, :], mask=m_rp, other=0.0).to(tl.float32)
        kf = tl.load(p_raw + P + o_s[None, :], mask=m_rs, other=0.0).to(tl.float32)
        qf = tl.load(p_raw + P + S + o_s[None, :], mask=m_rs, other=0.0).to(tl.float32)
        g_v = tl.load(d_v + o_dst[:, None] * P + o_p[None, :], mask=m_rp, other=0.0)
        g_lv = tl.load(d_lambda_v + o_dst[:, None] * P + o_p[None, :], mask=m_rp, other=0.0).to(tl.float32)
        g_k = tl.load(d_k + o_dst[:, None] * S + o_s[None, :], mask=m_rs, other=0.0).to(tl.float32)
        g_q = tl.load(d_q + o_dst[:, None] * S + o_s[None, :], mask=m_rs, other=0.0).to(tl.float32)
        # Λv = 1/(softplus(x) + c): dΛv/dx = −Λv²·sigmoid(x)
        softplus = _softplus(x)
        lam = 1.0 / (softplus + OBS_VAR_MIN)
        sig = 1.0 / (1.0 + tl.exp(-x))
        dt = d_sens.dtype.element_ty
        p_out = d_sens + o_src[:, None] * O
        tl.store(p_out + o_p[None, :], g_v.to(dt), mask=m_rp)
        tl.store(p_out + P + o_p[None, :], (-g_lv * lam * lam * sig).to(dt), mask=m_rp)
        tl.store(p_out + 2 * P + o_s[None, :], _normalize_bwd(kf, g_k, L2_EPS).to(dt), mask=m_rs)
        tl.store(p_out + 2 * P + S + o_s[None, :], _normalize_bwd(qf, g_q, L2_EPS).to(dt), mask=m_rs)

    def _grid(n_rows, P, S):
        BP, BS = triton.next_power_of_2(P), triton.next_power_of_2(S)
        BR = max(1, min(64, 4096 // BP))
        return BP, BS, BR, (triton.cdiv(n_rows, BR),)

    @torch.library.custom_op("kla::sensors_fwd", mutates_args=())
    def _sensors_fwd(sens: Tensor, d_state: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``(v, Λv, k̂, q̂, raw)``; raw ``[B, L, H, P+2S]`` is ``[log σ²_v | k | q]`` for the backward."""
        H, B, L, O = sens.shape
        S = d_state
        P = (O - 2 * S) // 2
        v, lambda_v = (sens.new_empty(B, L, H, P) for _ in range(2))
        k, q = (sens.new_empty(B, L, H, S) for _ in range(2))
        raw = sens.new_empty(B, L, H, P + 2 * S)
        n_rows = H * B * L
        BP, BS, BR, grid = _grid(n_rows, P, S)
        _sensors_fwd_kernel[grid](sens, v, lambda_v, k, q, raw, n_rows, B * L, H, P=P, S=S, BP=BP, BS=BS, BR=BR,
                                  OBS_VAR_MIN=OBS_VAR_MIN, L2_EPS=L2_EPS)
        return v, lambda_v, k, q, raw

    @_sensors_fwd.register_fake
    def _(sens, d_state):
        H, B, L, O = sens.shape
        P = (O - 2 * d_state) // 2
        return (*(sens.new_empty(B, L, H, P) for _ in range(2)), *(sens.new_empty(B, L, H, d_state) for _ in range(2)),
                sens.new_empty(B, L, H, P + 2 * d_state))

    @torch.library.custom_op("kla::sensors_bwd", mutates_args=())
    def _sensors_bwd(raw: Tensor, d_v: Tensor, d_lambda_v: Tensor, d_k: Tensor, d_q: Tensor, H: int) -> Tensor:
        B, L, _, R = raw.shape
        S = d_k.shape[-1]
        P = R - 2 * S
        d_sens = raw.new_empty(H, B, L, 2 * P + 2 * S)
        n_rows = H * B * L
        BP, BS, BR, grid = _grid(n_rows, P, S)
        _sensors_bwd_kernel[grid](raw, d_v, d_lambda_v, d_k, d_q, d_sens, n_rows, B * L, H, P=P, S=S, BP=BP, BS=BS,
                                  BR=BR, OBS_VAR_MIN=OBS_VAR_MIN, L2_EPS=L2_EPS)
        return d_sens

    @_sensors_bwd.register_fake
    def _(raw, d_v, d_lambda_v, d_k, d_q, H):
        B, L, _, R = raw.shape
        S = d_k.shape[-1]
        return raw.new_empty(H, B, L, 2 * (R - 2 * S) + 2 * S)

    def _setup(ctx, inputs, output):
        sens, ctx.d_state = inputs
        ctx.heads = sens.shape[0]
        ctx.mark_non_differentiable(output[4])
        ctx.save_for_backward(output[4])

    def _backward(ctx, d_v, d_lambda_v, d_k, d_q, _d_raw):
        (raw,) = ctx.saved_tensors
        B, L, H, R = raw.shape
        S = ctx.d_state
        P = R - 2 * S
        # an output the caller did not use has no gradient: zeros of its shape
        grads = [raw.new_zeros(B, L, H, w) if g is None else g.contiguous()
                 for g, w in zip((d_v, d_lambda_v, d_k, d_q), (P, P, S, S))]
        return torch.ops.kla.sensors_bwd(raw, *grads, ctx.heads), None

    _sensors_fwd.register_autograd(_backward, setup_context=_setup)
