"""One-token KLA step for decoding: O(1) work and memory per token.

``triton_kla_step`` is the fused CUDA kernel (one launch per layer and token, state updated in
fp32); elsewhere the step is ``filter_step`` of ``ops/kla_core.py``. Both share one signature
and are tested against each other and against the scan.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton still get the PyTorch step.
    triton = None


if triton is not None:
    from .chunk import block_sizes
    from .triton_common import channel_lanes

    @triton.jit
    def _kla_step_kernel(
        v, lambda_v, k, q, a, p, lam, eta, y, y_var, lam_out, eta_out,
        H: tl.constexpr, P: tl.constexpr, S: tl.constexpr, BP: tl.constexpr, BS: tl.constexpr,
    ):
        # Same [BS states, BP channels] lane blocks as the training kernels (chunk.py), but
        # the state stays in the user's [B, H, P, S] layout: one step has no hot loop whose
        # register layout a transposed copy would protect.
        i_bh, i_p = tl.program_id(0), tl.program_id(1)
        i_h = i_bh % H
        o_p, o_s, m_p, m_s, m_sp = channel_lanes(i_p, P, S, BP, BS)
        o_ps = o_p[None, :] * S + o_s[:, None]
        b_a = tl.load(a + i_h * P * S + o_ps, mask=m_sp, other=1.0).to(tl.float32)
        b_noise = tl.load(p + i_h * P * S + o_ps, mask=m_sp, other=0.0).to(tl.float32)
        b_a2 = b_a * b_a
        o_state = i_bh * P * S + o_ps
        b_lam = tl.load(lam + o_state, mask=m_sp, other=1.0).to(tl.float32)
        b_eta = tl.load(eta + o_state, mask=m_sp, other=0.0).to(tl.float32)
        b_v = tl.load(v + i_bh * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_lv = tl.load(lambda_v + i_bh * P + o_p, mask=m_p, other=0.0).to(tl.float32)
        b_k = tl.load(k + i_bh * S + o_s, mask=m_s, other=0.0).to(tl.float32)
        b_q = tl.load(q + i_bh * S + o_s, mask=m_s, other=0.0).to(tl.float32)
        b_inv_d = 1.0 / (b_a2 + b_noise * b_lam)
        b_lam = b_lam * b_inv_d + (b_k * b_k)[:, None] * b_lv[None, :]
        b_eta = b_a * b_inv_d * b_eta + b_k[:, None] * (b_v * b_lv)[None, :]
        b_sigma = 1.0 / b_lam
        b_y = tl.sum(b_q[:, None] * b_eta * b_sigma, axis=0)
        b_yv = tl.sum((b_q * b_q)[:, None] * b_sigma, axis=0)
        tl.store(y + i_bh * P + o_p, b_y.to(y.dtype.element_ty), mask=m_p)
        tl.store(y_var + i_bh * P + o_p, b_yv.to(y_var.dtype.element_ty), mask=m_p)
        tl.store(lam_out + o_state, b_lam.to(lam_out.dtype.element_ty), mask=m_sp)
        tl.store(eta_out + o_state, b_eta.to(eta_out.dtype.element_ty), mask=m_sp)


def triton_kla_step(v, lambda_v, k, q, a, p, lam, eta):
    """Fused decode step; same contract as ``kla_core.filter_step`` (state fp32, updated out of place)."""
    B, H, P = v.shape
    S = k.shape[-1]
    v, lambda_v, k, q, a, p, lam, eta = (x.contiguous() for x in (v, lambda_v, k, q, a, p, lam, eta))
    y, y_var = torch.empty_like(v), torch.empty_like(v)
    lam_out, eta_out = torch.empty_like(lam), torch.empty_like(eta)
    BP, BS, warps = block_sizes(P, S)
    grid = (B * H, triton.cdiv(P, BP))
    _kla_step_kernel[grid](v, lambda_v, k, q, a, p, lam, eta, y, y_var, lam_out, eta_out,
                           H=H, P=P, S=S, BP=BP, BS=BS, num_warps=warps)
    return y, y_var, lam_out, eta_out
