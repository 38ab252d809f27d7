"""Time-split KLA scan: for few lanes and long sequences (docs/kla.md#time-split), and for accuracy.

When batch × heads × channel blocks cannot fill the GPU, each row is cut into segments
of ``segment_len`` tokens that run as independent "sequences" of the same kernels:

forward:  segment transforms (one pass, docs/kla.md#transforms) → sequential compose of the few segment
          transforms per row in PyTorch → each segment's exact start state → the normal
          forward kernel over all segments at once.
backward: adjoint maps (Q, o) of every segment (docs/kla.md#backward), composed in forward order in one sweep
          (no replay) → suffix composition per row → each segment's exact end adjoint → the
          normal backward kernel over all segments.

The carries are composed from normalised transforms, so the fp32 drift of a long
sequential scan (a ≈ 1, p ≈ 0; docs/kla.md#numerics) is bounded by the segment length instead of L.

:func:`split_fwd` and :func:`split_bwd` are the bodies of the ``kla::split_fwd`` /
``kla::split_bwd`` custom ops of :mod:`.triton_scan`. They read nothing back to the host, so
they can run inside a CUDA graph.
"""
from __future__ import annotations

import torch

from . import transform as tr
from .carry import apply_adjoint_map, info_to_adjoint
from .chunk import CHUNK, kla_bwd, kla_fwd
from .chunk_carry import triton_chunk_transforms, triton_forward_adjoint_maps


def _cdiv(x: int, y: int) -> int:
    return -(-x // y)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    # Cached per device: the property query is a driver call on every forward otherwise.
    if device.type != "cuda":
        return 132  # an H200's, so CPU runs (interpreter) pick the same splits
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_segment_len(n_warps: int, L: int, device: torch.device):
    """A segment length (multiple of CHUNK, ≥ 4 chunks) when the ``n_warps`` warps of the
    unsplit scan leave a scheduler idle (< 4 per SM), or None. Splits aim at 8 warps per SM:
    at B1·L32768·M4096 on an H200 8 segments ran 34 ms forward+backward, 5 segments 46 ms,
    16 segments 34 ms (bench/README.md, run 4)."""
    n_sm = _sm_count(device)
    n_segments = min(_cdiv(8 * n_sm, n_warps), L // (4 * CHUNK))
    if n_warps >= 4 * n_sm or n_segments < 2:
        return None
    return _cdiv(_cdiv(L, n_segments), CHUNK) * CHUNK


def _segment_offsets(B: int, L: int, seg: int, device):
    """cu_seqlens of all segments ``[B·n_seg + 1]``, built on the device (a host list would be
    a host-to-device copy, which CUDA-graph capture forbids)."""
    starts = torch.arange(0, B * L, L, dtype=torch.int32, device=device)[:, None]
    bounds = (starts + torch.arange(0, L, seg, dtype=torch.int32, device=device)).flatten()
    return torch.cat([bounds, bounds.new_full((1,), B * L)]), _cdiv(L, seg)


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


def split_fwd(v, lambda_v, k, q, a, p, lam0, eta0, segment_len, output_variance=True):
    """Forward over segments (inputs contiguous, a/p/state fp32; ``lam0`` may be None).

    Returns ``(y, y_var, lam_f, eta_f, lam_s, eta_s, ck_sigma, ck_mu)``: the final and start
    states of every segment ``[B·n_seg, H, P, S]`` (a row's final state is its last segment's)
    and the forward checkpoints; all but y, y_var are kept for :func:`split_bwd`.
    """
    B, L, H, P = v.shape
    S = k.shape[-1]
    cu, n_seg = _segment_offsets(B, L, segment_len, v.device)
    if lam0 is None:
        lam0 = torch.ones(B, H, P, S, dtype=torch.float32, device=v.device)
        eta0 = torch.zeros_like(lam0)
    transforms = triton_chunk_transforms(v * lambda_v, lambda_v, k, a, p, cu_seqlens=cu)
    lam_s, eta_s = _start_states(transforms, lam0, eta0, B, n_seg)
    y, y_var, (lam_f, eta_f), ck = kla_fwd(v, lambda_v, k, q, a, p, lam_s, eta_s, cu, True, True, output_variance)
    return y, y_var, lam_f, eta_f, lam_s, eta_s, *ck


def split_bwd(v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu,
              d_y, d_yvar, d_lam_t, d_eta_t, segment_len, deterministic):
    """Gradients of :func:`split_fwd`; ``d_lam_t``, ``d_eta_t`` ``[B, H, P, S]`` (or None) are the
    cotangents of the rows' final states. Returns the 6 input gradients and those of the rows'
    initial state ``[B, H, P, S]``."""
    B, L = v.shape[:2]
    cu, n_seg = _segment_offsets(B, L, segment_len, v.device)
    # Adjoint of each segment's final state: zero except the rows' last segments.
    end = torch.zeros(2, *lam_f.shape, dtype=torch.float32, device=v.device)
    if d_lam_t is not None or d_eta_t is not None:
        last = (lam_f.unflatten(0, (B, n_seg))[:, -1], eta_f.unflatten(0, (B, n_seg))[:, -1])
        d_lam = torch.zeros_like(last[0]) if d_lam_t is None else d_lam_t
        d_eta = torch.zeros_like(last[1]) if d_eta_t is None else d_eta_t
        end.unflatten(1, (B, n_seg))[:, :, -1] = info_to_adjoint(d_lam, d_eta, *last)
    args = (v, lambda_v, k, q, a, p, lam_s, eta_s, (lam_f, eta_f), (ck_sigma, ck_mu), cu, d_y, d_yvar, None, None)
    q_map, o_map = triton_forward_adjoint_maps(v, lambda_v, k, q, a, p, lam_s, eta_s, d_y, d_yvar, end_adjoint=end,
                                               cu_seqlens=cu)
    ends = _end_adjoints(q_map, o_map, end.unflatten(1, (B, n_seg))[:, :, -1], B, n_seg)
    d_v, d_lv, d_k, d_q, d_a, d_p, d_lam_s, d_eta_s = kla_bwd(*args, deterministic=deterministic, end_adjoint=ends)
    # Segment 0 of every row starts from the rows' initial state.
    return d_v, d_lv, d_k, d_q, d_a, d_p, d_lam_s[::n_seg].contiguous(), d_eta_s[::n_seg].contiguous()
