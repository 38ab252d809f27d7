"""Triton KLA scan as ``torch.library`` custom ops, so ``torch.compile`` and CUDA graphs see it.

Ops (namespace ``kla``), each with a fake (shape-only) implementation for tracing:

- ``kla::chunk_fwd`` / ``kla::chunk_bwd``: whole rows or packed documents in one pass
  (:func:`.chunk.kla_fwd` / :func:`.chunk.kla_bwd`).
- ``kla::split_fwd`` / ``kla::split_bwd``: the time-split path of :mod:`.chunk_split`.

Each forward op carries an autograd formula (``register_autograd``) that calls its backward
op, so dynamo records one opaque node per direction and AOT autograd builds the backward graph
from it: a KLA layer compiles with ``fullgraph=True``. Op schemas cannot return None, so absent
outputs (the final state without ``output_final_state``, gradients of an absent initial state)
are empty tensors that :func:`triton_kla_scan` and the autograd formulas map back to None.
The forward checkpoints travel flat: :func:`.chunk.kla_bwd` only hands them to its kernel as
pointers, so their layout stays the launchers' business (only their size is mirrored here).

Nothing here reads device values on the host or copies from it, so with
``kla_scan(..., check_values=False)`` forward and backward can be captured in a CUDA graph
(kernels must have been compiled by an eager warm-up run first).
"""
from typing import Optional, Tuple

import torch
import triton
from torch import Tensor

from . import chunk
from .chunk import CHUNK, kla_bwd, kla_fwd
from .chunk_split import choose_segment_len, split_bwd, split_fwd

_F32 = torch.float32


def _empty(like: Tensor) -> Tensor:
    """Stand-in for an absent output (each call a separate tensor: op outputs may not alias)."""
    return like.new_empty(0, dtype=_F32)


def _flat(checkpoints):
    return tuple(c.view(-1) for c in checkpoints)


def _checkpoint_numel(n_seq, v, k):
    """Size of one checkpoint buffer of :func:`.chunk.kla_fwd` (a state per sequence and per
    CHUNK tokens; the slot count is the launcher's own :func:`.chunk.checkpoint_slots`)."""
    B, L, H, P = v.shape
    return chunk.checkpoint_slots(n_seq, B * L) * H * P * k.shape[-1]


# ----------------------------------------------------------------------------- one pass


@torch.library.custom_op("kla::chunk_fwd", mutates_args=())
def _chunk_fwd(
    v: Tensor, lambda_v: Tensor, k: Tensor, q: Tensor, a: Tensor, p: Tensor,
    lam0: Optional[Tensor], eta0: Optional[Tensor], cu_seqlens: Optional[Tensor],
    output_final_state: bool, save_checkpoints: bool, deterministic: bool, output_variance: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, y_var, lam_t, eta_t, ck_sigma, ck_mu)``; ``deterministic`` is for the backward only."""
    y, y_var, final, ck = kla_fwd(v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens, output_final_state,
                                  save_checkpoints, output_variance)
    lam_t, eta_t = final if final is not None else (_empty(v), _empty(v))
    return y, _empty(v) if y_var is None else y_var, lam_t, eta_t, *_flat(ck)


@_chunk_fwd.register_fake
def _(v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens, output_final_state, save_checkpoints, deterministic,
      output_variance):
    B, L, H, P = v.shape
    n_seq = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    state = (n_seq, H, P, k.shape[-1])
    final = [v.new_empty(state, dtype=_F32) for _ in range(2)] if output_final_state else [_empty(v), _empty(v)]
    ck = _checkpoint_numel(n_seq, v, k) if save_checkpoints else 1
    y_var = torch.empty_like(v) if output_variance else _empty(v)
    return torch.empty_like(v), y_var, *final, *(v.new_empty(ck, dtype=_F32) for _ in range(2))


@torch.library.custom_op("kla::chunk_bwd", mutates_args=())
def _chunk_bwd(
    v: Tensor, lambda_v: Tensor, k: Tensor, q: Tensor, a: Tensor, p: Tensor,
    lam0: Optional[Tensor], eta0: Optional[Tensor], lam_t: Optional[Tensor], eta_t: Optional[Tensor],
    ck_sigma: Tensor, ck_mu: Tensor, cu_seqlens: Optional[Tensor],
    d_y: Tensor, d_yvar: Optional[Tensor], d_lam_t: Optional[Tensor], d_eta_t: Optional[Tensor], deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of v, λv, k, q, a, p, lam0, eta0 (the last two empty without ``lam0``)."""
    final = (lam_t, eta_t) if lam_t is not None else None
    grads = kla_bwd(v, lambda_v, k, q, a, p, lam0, eta0, final, (ck_sigma, ck_mu), cu_seqlens,
                    d_y, d_yvar, d_lam_t, d_eta_t, deterministic)
    d_state = grads[6:] if lam0 is not None else (_empty(v), _empty(v))
    return (*grads[:6], *d_state)


@_chunk_bwd.register_fake
def _(v, lambda_v, k, q, a, p, lam0, eta0, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens, d_y, d_yvar, d_lam_t,
      d_eta_t, deterministic):
    d_state = [torch.empty_like(s, dtype=_F32) for s in (lam0, eta0)] if lam0 is not None else [_empty(v), _empty(v)]
    return (*(torch.empty_like(x) for x in (v, lambda_v, k, q, a, p)), *d_state)


def _chunk_setup(ctx, inputs, output):
    v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens, output_final_state, _, deterministic, _ = inputs
    _, _, lam_t, eta_t, ck_sigma, ck_mu = output
    ctx.output_final_state, ctx.deterministic = output_final_state, deterministic
    # Checkpoints are saved state, not results: no gradient buffers are made for them, nor
    # (materialize off) for outputs the caller did not use.
    ctx.mark_non_differentiable(ck_sigma, ck_mu)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(v, lambda_v, k, q, a, p, lam0, eta0, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens)


def _chunk_backward(ctx, d_y, d_yvar, d_lam_t, d_eta_t, _d_ck_sigma, _d_ck_mu):
    v, lambda_v, k, q, a, p, lam0, eta0, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens = ctx.saved_tensors
    if not ctx.output_final_state:
        lam_t = eta_t = d_lam_t = d_eta_t = None
    d_y, d_yvar = _cotangent(d_y, v), _var_cotangent(d_yvar)
    grads = torch.ops.kla.chunk_bwd(v, lambda_v, k, q, a, p, lam0, eta0, lam_t, eta_t, ck_sigma, ck_mu, cu_seqlens,
                                    d_y, d_yvar, d_lam_t, d_eta_t, ctx.deterministic)
    d_state = grads[6:] if lam0 is not None else (None, None)
    return (*grads[:6], *d_state, None, None, None, None, None)


_chunk_fwd.register_autograd(_chunk_backward, setup_context=_chunk_setup)


def _cotangent(d: Optional[Tensor], like: Tensor) -> Tensor:
    return torch.zeros_like(like) if d is None else d.contiguous()


def _var_cotangent(d: Optional[Tensor]) -> Optional[Tensor]:
    """y_var's cotangent, None when y_var was not returned or not used: the backward kernel
    then drops its terms instead of reading zeros."""
    return None if d is None or d.numel() == 0 else d.contiguous()


# ----------------------------------------------------------------------------- time split


@torch.library.custom_op("kla::split_fwd", mutates_args=())
def _split_fwd(
    v: Tensor, lambda_v: Tensor, k: Tensor, q: Tensor, a: Tensor, p: Tensor,
    lam0: Optional[Tensor], eta0: Optional[Tensor], segment_len: int, deterministic: bool, output_variance: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, y_var, lam_f, eta_f, lam_s, eta_s, ck_sigma, ck_mu)`` of :func:`.chunk_split.split_fwd`."""
    y, y_var, *out, ck_sigma, ck_mu = split_fwd(v, lambda_v, k, q, a, p, lam0, eta0, segment_len, output_variance)
    return y, _empty(v) if y_var is None else y_var, *out, *_flat((ck_sigma, ck_mu))


@_split_fwd.register_fake
def _(v, lambda_v, k, q, a, p, lam0, eta0, segment_len, deterministic, output_variance):
    B, L, H, P = v.shape
    n_seg = -(-L // segment_len)
    state = [v.new_empty(B * n_seg, H, P, k.shape[-1], dtype=_F32) for _ in range(4)]
    ck = [v.new_empty(_checkpoint_numel(B * n_seg, v, k), dtype=_F32) for _ in range(2)]
    return torch.empty_like(v), torch.empty_like(v) if output_variance else _empty(v), *state, *ck


@torch.library.custom_op("kla::split_bwd", mutates_args=())
def _split_bwd(
    v: Tensor, lambda_v: Tensor, k: Tensor, q: Tensor, a: Tensor, p: Tensor,
    lam_s: Tensor, eta_s: Tensor, lam_f: Tensor, eta_f: Tensor, ck_sigma: Tensor, ck_mu: Tensor,
    d_y: Tensor, d_yvar: Optional[Tensor], d_lam_t: Optional[Tensor], d_eta_t: Optional[Tensor],
    segment_len: int, deterministic: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of v, λv, k, q, a, p and the rows' initial state (:func:`.chunk_split.split_bwd`)."""
    return split_bwd(v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu,
                     d_y, d_yvar, d_lam_t, d_eta_t, segment_len, deterministic)


@_split_bwd.register_fake
def _(v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu, d_y, d_yvar, d_lam_t, d_eta_t,
      segment_len, deterministic):
    state = (v.shape[0], *lam_s.shape[1:])
    return (*(torch.empty_like(x) for x in (v, lambda_v, k, q, a, p)), *(v.new_empty(state, dtype=_F32)
                                                                          for _ in range(2)))


def _split_setup(ctx, inputs, output):
    v, lambda_v, k, q, a, p, lam0, _, segment_len, deterministic, _ = inputs
    _, _, lam_f, eta_f, lam_s, eta_s, ck_sigma, ck_mu = output
    ctx.has_state, ctx.segment_len, ctx.deterministic = lam0 is not None, segment_len, deterministic
    ctx.mark_non_differentiable(lam_s, eta_s, ck_sigma, ck_mu)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu)


def _split_backward(ctx, d_y, d_yvar, d_lam_f, d_eta_f, *_):
    v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu = ctx.saved_tensors
    # triton_kla_scan returns the last segment's final state of each row: only those rows
    # of the segments' final-state cotangent can be nonzero.
    d_lam_t, d_eta_t = (None if d is None else d.view(v.shape[0], -1, *d.shape[1:])[:, -1].contiguous()
                        for d in (d_lam_f, d_eta_f))
    grads = torch.ops.kla.split_bwd(v, lambda_v, k, q, a, p, lam_s, eta_s, lam_f, eta_f, ck_sigma, ck_mu,
                                    _cotangent(d_y, v), _var_cotangent(d_yvar), d_lam_t, d_eta_t,
                                    ctx.segment_len, ctx.deterministic)
    d_state = grads[6:] if ctx.has_state else (None, None)
    return (*grads[:6], *d_state, None, None, None)


_split_fwd.register_autograd(_split_backward, setup_context=_split_setup)


# ----------------------------------------------------------------------------- public


def triton_kla_scan(v, lambda_v, k, q, a, p, initial_state=None, output_final_state=False,
                    cu_seqlens=None, deterministic=False, segment_len=None, output_variance=True):
    """Triton backend of :func:`kla_megatron.ops.kla.kla_scan` (inputs already validated).

    ``segment_len``: cut each row into segments of this many tokens (multiple of CHUNK) and
    combine them with transforms (:mod:`.chunk_split`); chosen automatically when the lanes
    alone cannot fill the GPU. Packed (``cu_seqlens``) inputs run unsplit. Without
    ``output_variance`` y_var is not computed (returned as None).
    """
    if v.dtype == torch.float64:
        raise ValueError("kla_scan: the Triton backend computes in fp32; use backend='torch' for float64")
    v, lambda_v, k, q = (x.contiguous() for x in (v, lambda_v, k, q))
    a, p = a.float().contiguous(), p.float().contiguous()
    lam0, eta0 = (s.float().contiguous() for s in initial_state) if initial_state is not None else (None, None)
    B, L, H, P = v.shape
    if cu_seqlens is None and segment_len is None:
        BP, _, warps = chunk.block_sizes(P, k.shape[-1])
        segment_len = choose_segment_len(B * H * triton.cdiv(P, BP) * warps, L, v.device)
    if cu_seqlens is None and segment_len is not None and segment_len < L:
        if segment_len % CHUNK:
            raise ValueError(f"segment_len must be a multiple of {CHUNK}, got {segment_len}")
        y, y_var, lam_f, eta_f, *_ = torch.ops.kla.split_fwd(v, lambda_v, k, q, a, p, lam0, eta0, segment_len,
                                                            deterministic, output_variance)
        # view, not unflatten: Tensor.unflatten is a Python method, and under a TorchFunctionMode
        # (the CPU megatron shim keeps one pushed) dynamo fails to trace its super() call
        final = tuple(f.view(B, -1, *f.shape[1:])[:, -1] for f in (lam_f, eta_f))
    else:
        # Checkpoints only when a backward can follow (a static fact for torch.compile).
        tensors = (v, lambda_v, k, q, a, p, lam0, eta0)
        save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
        y, y_var, *final, _, _ = torch.ops.kla.chunk_fwd(v, lambda_v, k, q, a, p, lam0, eta0, cu_seqlens,
                                                         output_final_state, save, deterministic, output_variance)
    return y, (y_var if output_variance else None), (tuple(final) if output_final_state else None)
