"""Blocked sequential KLA scan in PyTorch: the fast exact path on the CPU.

The filter is walked token by token (as in :mod:`.naive`), but every step is a handful of
fused elementwise ops on all ``B·H·P·S`` lanes at once, and everything that does not depend
on the carried state (the sensor terms φ = Λv·k², r = v·Λv·k, the read-outs y and y_var and,
in the backward, the per-token adjoint sources and the parameter gradients) is computed
vectorised over a block of ``block`` tokens outside the loop.

The backward is a custom :class:`torch.autograd.Function`: one reverse sweep with the step's
Jacobian written out (docs/kla.md#backward), no autograd graph over the time loop. Only the state
at every block start is kept from the forward; each block's states are recomputed in the
backward (memory O(B·L·H·P + (L/block)·B·H·P·S)). The Jacobian is taken in the forms that do
not cancel: ∂λ'/∂λ = a²/d², ∂η'/∂λ = −a·p·η/d², ∂η'/∂η = a/d with d = a² + p·λ.

On a few CPU cores this beats the parallel scan (:mod:`.chunk_torch`, whose 7-number
transforms do ~log2(C)·7x the arithmetic and memory traffic) by 30-240x; see
``bench/bench_scan_cpu.py`` and bench/README.md. ``kla_scan(backend="auto")`` picks it on
the CPU.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import transform as tr

State = Tuple[torch.Tensor, torch.Tensor]
BLOCK_ELEMS = 1 << 18  # lanes x tokens per block buffer (1 MiB in fp32: stays in cache)


def default_block(lanes: int) -> int:
    """Tokens per block: ~BLOCK_ELEMS per [T, B, H, P, S] buffer, a power of two in [16, 256]
    (measured on the CPU, bench/README.md: 16-32 tokens at 8-16K lanes beat 128 by 1.5-3x)."""
    t = max(BLOCK_ELEMS // max(lanes, 1), 1)
    return min(max(1 << (t.bit_length() - 1), 16), 256)


def _sensor_terms(v, lambda_v, k):
    """φ = Λv·k², r = v·Λv·k for a time-major block: v, Λv [T, B, H, P], k [T, B, H, S]
    → [T, B, H, P, S] each."""
    ke = k[:, :, :, None, :]
    lv = lambda_v[..., None]
    return lv * (ke * ke), (v * lambda_v)[..., None] * ke


def _walk(phi, r, a, a2, p, lam, eta, lam_out, eta_out):
    """States after every token of a block, written into lam_out/eta_out [T, ...]."""
    d = torch.empty_like(lam)
    for t in range(phi.shape[0]):
        torch.addcmul(a2, p, lam, out=d)
        d.reciprocal_()
        lam = torch.addcmul(phi[t], lam, d, out=lam_out[t])
        d.mul_(a)
        eta = torch.addcmul(r[t], eta, d, out=eta_out[t])
    return lam, eta


def _readout(q, lam_all, eta_all, want_var):
    """y, y_var [T, B, H, P] from q [T, B, H, S] and states [T, B, H, P, S]."""
    sigma = lam_all.reciprocal()
    qe = q[:, :, :, None, :]
    y = (qe * (eta_all * sigma)).sum(-1)
    y_var = ((qe * qe) * sigma).sum(-1) if want_var else None
    return y, y_var


def _segment_forward(v, lambda_v, k, q, a, p, lam, eta, y, y_var, block, starts: Optional[List]):
    """Walk one sequence batch (time-major v, Λv [T, B, H, P], k, q [T, B, H, S]; state
    [B, H, P, S]), writing y / y_var [T, B, H, P] in place. Returns the final state; with
    ``starts`` a list, appends each block's starting state to it."""
    L = v.shape[0]
    a2 = a * a
    for t0 in range(0, L, block):
        t1 = min(t0 + block, L)
        if starts is not None:
            starts.append((lam, eta))
        phi, r = _sensor_terms(v[t0:t1], lambda_v[t0:t1], k[t0:t1])
        lam_all, eta_all = torch.empty_like(phi), torch.empty_like(phi)
        lam, eta = _walk(phi, r, a, a2, p, lam, eta, lam_all, eta_all)
        yb, yvb = _readout(q[t0:t1], lam_all, eta_all, y_var is not None)
        y[t0:t1] = yb
        if y_var is not None:
            y_var[t0:t1] = yvb
        lam, eta = lam.clone(), eta.clone()  # detach from the block buffers
    return lam, eta


def _segment_backward(v, lambda_v, k, q, a, p, starts, gy, gyv, glam, geta, grads, block):
    """Reverse sweep over one segment. ``grads`` = (gv, glv, gk, gq) time-major outputs to fill,
    plus ga, gp accumulators [H, P, S]; glam, geta: cotangents of the final state. Returns the
    cotangents of the segment's initial state."""
    gv, glv, gk, gq, ga, gp = grads
    L = v.shape[0]
    a2 = a * a
    n_blocks = len(starts)
    for i in reversed(range(n_blocks)):
        t0 = i * block
        t1 = min(t0 + block, L)
        lam0, eta0 = starts[i]
        vb, lvb, kb, qb = v[t0:t1], lambda_v[t0:t1], k[t0:t1], q[t0:t1]
        phi, r = _sensor_terms(vb, lvb, kb)
        lam_all, eta_all = torch.empty_like(phi), torch.empty_like(phi)
        _walk(phi, r, a, a2, p, lam0, eta0, lam_all, eta_all)
        del phi, r
        # States before every token of the block.
        lam_prev = torch.cat([lam0[None], lam_all[:-1]])
        eta_prev = torch.cat([eta0[None], eta_all[:-1]])
        # Direct adjoint sources from the read-outs y = Σ q·η/λ, y_var = Σ q²/λ.
        sigma = lam_all.reciprocal()
        mu = eta_all * sigma
        del lam_all, eta_all
        qe = qb[:, :, :, None, :]
        gye = gy[t0:t1, ..., None]
        src_eta = gye * qe * sigma
        src_lam = -(src_eta * mu)
        if gyv is not None:
            gyve = gyv[t0:t1, ..., None]
            src_lam -= gyve * (qe * qe) * sigma * sigma
            gq[t0:t1] = (gye * mu + 2 * gyve * qe * sigma).sum(-2)
        else:
            gq[t0:t1] = (gye * mu).sum(-2)
        del sigma, mu
        # Step Jacobian coefficients (stable forms, module docstring).
        inv = (a2 + p * lam_prev).reciprocal_()
        c_ee = a * inv
        inv2 = inv * inv
        del inv
        c_ll = a2 * inv2
        c_le = -(a * p) * eta_prev * inv2
        # Reverse sweep: src_* become the total adjoints of the post-token states.
        for t in range(t1 - t0 - 1, -1, -1):
            glam = torch.add(src_lam[t], glam, out=src_lam[t])
            geta = torch.add(src_eta[t], geta, out=src_eta[t])
            glam = torch.addcmul(glam * c_ll[t], geta, c_le[t])
            geta = geta * c_ee[t]
        GL, GE = src_lam, src_eta
        del c_ll, c_le, c_ee
        # Parameter gradients: λ' = λ/d, η' = a·η/d, d = a² + p·λ.
        ga -= (GL * lam_prev * inv2).sum((0, 1)) * (2 * a)
        ga += (GE * eta_prev * (p * lam_prev - a2) * inv2).sum((0, 1))
        gp -= (GL * lam_prev * lam_prev * inv2).sum((0, 1))
        gp -= (GE * eta_prev * lam_prev * inv2).sum((0, 1)) * a
        del lam_prev, eta_prev, inv2
        # Sensor gradients: φ = Λv·k², r = v·Λv·k.
        ke = kb[:, :, :, None, :]
        g_vlv = (GE * ke).sum(-1)  # ∂/∂(v·Λv)
        glv[t0:t1] = (GL * (ke * ke)).sum(-1) + g_vlv * vb
        gv[t0:t1] = g_vlv * lvb
        gk[t0:t1] = 2 * kb * (GL * lvb[..., None]).sum(-2) + (GE * (vb * lvb)[..., None]).sum(-2)
    return glam, geta


def _time_major(*xs):
    return [x.transpose(0, 1).contiguous() for x in xs]


def _forward(v, lambda_v, k, q, a, p, lam0, eta0, bounds, want_var, block, keep_starts):
    """Runs every segment. v.. [B, L, ...]; returns (y, y_var [B, L, H, P], lam, eta [N, ...],
    per-segment block starts or None)."""
    vt, lvt, kt, qt = _time_major(v, lambda_v, k, q)
    y = torch.empty_like(vt)
    y_var = torch.empty_like(vt) if want_var else None
    all_starts = [] if keep_starts else None
    if bounds is None:
        starts = [] if keep_starts else None
        lam, eta = _segment_forward(vt, lvt, kt, qt, a, p, lam0, eta0, y, y_var, block, starts)
        if keep_starts:
            all_starts.append(starts)
    else:
        lams, etas = [], []
        for n, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
            starts = [] if keep_starts else None
            lam, eta = _segment_forward(vt[s:e], lvt[s:e], kt[s:e], qt[s:e], a, p, lam0[n:n + 1],
                                        eta0[n:n + 1], y[s:e], None if y_var is None else y_var[s:e],
                                        block, starts)
            lams.append(lam)
            etas.append(eta)
            if keep_starts:
                all_starts.append(starts)
        lam, eta = torch.cat(lams), torch.cat(etas)
    y = y.transpose(0, 1)
    y_var = y_var.transpose(0, 1) if want_var else None
    return y, y_var, lam, eta, (vt, lvt, kt, qt), all_starts


class _RecurrentScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, lambda_v, k, q, a, p, lam0, eta0, bounds, want_var, block):
        y, y_var, lam, eta, tm, starts = _forward(v, lambda_v, k, q, a, p, lam0, eta0, bounds, want_var,
                                                  block, keep_starts=True)
        ctx.save_for_backward(*tm, a, p)
        ctx.starts, ctx.bounds, ctx.want_var, ctx.block = starts, bounds, want_var, block
        ctx.shape = v.shape
        if not want_var:
            y_var = y.new_zeros(())
            ctx.mark_non_differentiable(y_var)
        return y, y_var, lam, eta

    @staticmethod
    def backward(ctx, gy, gyv, glam, geta):
        vt, lvt, kt, qt, a, p = ctx.saved_tensors
        gyt = gy.transpose(0, 1).contiguous()
        gyvt = gyv.transpose(0, 1).contiguous() if ctx.want_var else None
        gv, glv = torch.empty_like(vt), torch.empty_like(vt)
        gk, gq = torch.empty_like(kt), torch.empty_like(kt)
        ga, gp = torch.zeros_like(a), torch.zeros_like(p)
        grads = (gv, glv, gk, gq, ga, gp)
        if ctx.bounds is None:
            g_lam0, g_eta0 = _segment_backward(vt, lvt, kt, qt, a, p, ctx.starts[0], gyt, gyvt, glam, geta,
                                               grads, ctx.block)
        else:
            b = ctx.bounds
            g0 = []
            for n, (s, e) in enumerate(zip(b[:-1], b[1:])):
                seg = (gv[s:e], glv[s:e], gk[s:e], gq[s:e], ga, gp)
                g0.append(_segment_backward(vt[s:e], lvt[s:e], kt[s:e], qt[s:e], a, p, ctx.starts[n], gyt[s:e],
                                            None if gyvt is None else gyvt[s:e], glam[n:n + 1],
                                            geta[n:n + 1], seg, ctx.block))
            g_lam0 = torch.cat([g[0] for g in g0])
            g_eta0 = torch.cat([g[1] for g in g0])
        tr = lambda x: x.transpose(0, 1)  # noqa: E731
        return tr(gv), tr(glv), tr(gk), tr(gq), ga, gp, g_lam0, g_eta0, None, None, None


def recurrent_kla_scan(
    v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    output_variance: bool = True,
    block: Optional[int] = None,
):
    """Same contract as :func:`kla_megatron.ops.kla.kla_scan`; computes in fp32 (float64
    when ``a`` is float64), returns y, y_var in the dtype of ``v``."""
    io_dtype = v.dtype
    (v, lambda_v, k, q, a, p), (lam0, eta0) = tr.working_inputs(v, lambda_v, k, q, a, p, initial_state, cu_seqlens)
    B, L, H, P = v.shape
    S = k.shape[-1]
    if block is None:
        block = default_block((1 if cu_seqlens is not None else B) * H * P * S)
    bounds = None if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
    a, p = a.contiguous(), p.contiguous()
    leaves = (v, lambda_v, k, q, a, p, lam0, eta0)
    if torch.is_grad_enabled() and any(x.requires_grad for x in leaves):
        y, y_var, lam, eta = _RecurrentScan.apply(*leaves, bounds, output_variance, block)
        if not output_variance:
            y_var = None
    else:
        y, y_var, lam, eta, _, _ = _forward(*leaves, bounds, output_variance, block, keep_starts=False)
    y = y.to(io_dtype)
    y_var = None if y_var is None else y_var.to(io_dtype)
    return y, y_var, ((lam, eta) if output_final_state else None)
