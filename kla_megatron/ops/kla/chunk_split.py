"""Time-split KLA scan: for few lanes and long sequences (kla_math.md §7), and for accuracy.

When batch × heads × channel blocks cannot fill the GPU, each row is cut into segments
of ``segment_len`` tokens that run as independent "sequences" of the same kernels:

forward:  segment transforms (one pass, §3) → sequential compose of the few segment
          transforms per row in PyTorch → each segment's exact start state → the normal
          forward kernel over all segments at once.
backward: adjoint maps (Q, o) of every segment (§6) → suffix composition per row →
          each segment's exact end adjoint → the normal backward kernel over all segments.

The carries are composed from normalised transforms, so the fp32 drift of a long
sequential scan (a ≈ 1, p ≈ 0; §8) is bounded by the segment length instead of L.
"""
from __future__ import annotations

import torch

from . import transform as tr
from .carry import apply_adjoint_map, info_to_adjoint
from .chunk import CHUNK, kla_bwd, kla_fwd
from .chunk_carry import triton_chunk_transforms


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


def choose_segment_len(n_warps: int, L: int, device: torch.device):
    """A segment length (multiple of CHUNK, ≥ 4 chunks) when the ``n_warps`` warps of the
    unsplit scan leave a scheduler idle (< 4 per SM), or None. Splits aim at 8 warps per SM:
    at B1·L32768·M4096 on an H200 8 segments ran 34 ms forward+backward, 5 segments 46 ms,
    16 segments 34 ms (bench/README.md, run 4)."""
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    n_segments = min(_cdiv(8 * n_sm, n_warps), L // (4 * CHUNK))
    if n_warps >= 4 * n_sm or n_segments < 2:
        return None
    return _cdiv(_cdiv(L, n_segments), CHUNK) * CHUNK


def _segment_offsets(B: int, L: int, seg: int, device):
    bounds = [b * L + s for b in range(B) for s in range(0, L, seg)] + [B * L]
    return torch.tensor(bounds, dtype=torch.int32, device=device), -(-L // seg)


def _start_states(transforms, lam0, eta0, B, n_seg):
    """Exact start state of every segment: [B·n_seg, H, P, S] each."""
    t = transforms.unflatten(1, (B, n_seg))
    lams, etas = [lam0], [eta0]
    for j in range(n_seg - 1):
        lam, eta = tr.apply(t[:, :, j], lams[-1], etas[-1])
        lams.append(lam)
        etas.append(eta)
    return torch.stack(lams, 1).flatten(0, 1), torch.stack(etas, 1).flatten(0, 1)


def _end_adjoints(q_map, o_map, last_end, B, n_seg):
    """End adjoint of every segment [2, B·n_seg, H, P, S]; the last segment's is ``last_end``
    (already folded into its own o)."""
    q_map = q_map.unflatten(1, (B, n_seg))
    o_map = o_map.unflatten(1, (B, n_seg))
    ends = [last_end]
    c = torch.zeros_like(last_end)  # the last segment's o already holds its end adjoint
    for j in range(n_seg - 1, 0, -1):
        c = apply_adjoint_map(q_map[:, :, j], o_map[:, :, j], c)
        ends.append(c)
    return torch.stack(ends[::-1], 2).flatten(1, 2)


class KLASplitScanFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, lambda_v, k, q, a, p, lam0, eta0, segment_len, output_final_state, deterministic):
        B, L, H, P = v.shape
        S = k.shape[-1]
        cu, n_seg = _segment_offsets(B, L, segment_len, v.device)
        ctx.has_state, ctx.deterministic = lam0 is not None, deterministic
        if lam0 is None:
            lam0 = torch.ones(B, H, P, S, dtype=torch.float32, device=v.device)
            eta0 = torch.zeros_like(lam0)
        transforms = triton_chunk_transforms(v * lambda_v, lambda_v, k, a, p, cu_seqlens=cu)
        starts = _start_states(transforms, lam0, eta0, B, n_seg)
        y, y_var, finals, ck = kla_fwd(v, lambda_v, k, q, a, p, *starts, cu, True, True)
        ctx.save_for_backward(v, lambda_v, k, q, a, p, *starts, *finals, *ck, cu)
        ctx.n_seg = n_seg
        if output_final_state:
            lam_t, eta_t = (f.unflatten(0, (B, n_seg))[:, -1] for f in finals)
            return y, y_var, lam_t, eta_t
        return y, y_var, None, None

    @staticmethod
    def backward(ctx, d_y, d_yvar, d_lam_t, d_eta_t):
        v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu, cu = ctx.saved_tensors
        B, n_seg = v.shape[0], ctx.n_seg
        d_y, d_yvar = d_y.contiguous(), d_yvar.contiguous()
        # Adjoint of each segment's final state: zero except the rows' last segments.
        end = torch.zeros(2, *lam_f.shape, dtype=torch.float32, device=v.device)
        if d_lam_t is not None or d_eta_t is not None:
            last = (lam_f.unflatten(0, (B, n_seg))[:, -1], eta_f.unflatten(0, (B, n_seg))[:, -1])
            d_lam = torch.zeros_like(last[0]) if d_lam_t is None else d_lam_t
            d_eta = torch.zeros_like(last[1]) if d_eta_t is None else d_eta_t
            end.unflatten(1, (B, n_seg))[:, :, -1] = info_to_adjoint(d_lam, d_eta, *last)
        ck = (ck_sigma, ck_mu)
        args = (v, lambda_v, k, q, a, p, lam_s, eta_s, (lam_f, eta_f), ck, cu, d_y, d_yvar, None, None)
        q_map, o_map = kla_bwd(*args, deterministic=True, end_adjoint=end, map_only=True)
        ends = _end_adjoints(q_map, o_map, end.unflatten(1, (B, n_seg))[:, :, -1], B, n_seg)
        d_v, d_lv, d_k, d_q, d_a, d_p, d_lam0, d_eta0 = kla_bwd(
            *args, deterministic=ctx.deterministic, end_adjoint=ends
        )
        if ctx.has_state:
            first = slice(None, None, n_seg)  # segment 0 of every row starts from the user's state
            d_lam0, d_eta0 = d_lam0[first], d_eta0[first]
        else:
            d_lam0 = d_eta0 = None
        return d_v, d_lv, d_k, d_q, d_a, d_p, d_lam0, d_eta0, None, None, None
