"""Context parallelism for the KLA scan: each rank keeps its sequence shard and exchanges only
per-chunk carries, one all-gather per direction (docs/kla.md#context-parallelism).

Forward:  chunk transforms (7 numbers per lane, fp32) -> all-gather -> exclusive prefix
          compose in global chunk order -> this chunk's exact start state -> local ``kla_scan``.
Backward: end-adjoint maps ``(Q, o)`` (5 numbers per lane) -> all-gather -> suffix compose ->
          the true adjoint at the end of each local chunk -> local backward.

Sizes exchanged per layer: fp32 ``[7, R, H, P, S]`` forward and ``[5, R, H, P, S]`` backward
per chunk (R = batch rows, 1 when packed), times CP ranks (times 2 for the load-balanced order).

This module owns no parameters and is never checkpointed: the mixer's math is the same at
CP = 1 and CP = 8. Gradients of ``a`` and ``p`` (and of the initial state)
are each rank's local contribution: they join the normal data+context-parallel gradient
all-reduce, exactly like every other weight's gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from ..ops.kla import kla_scan, triton_available
from ..ops.kla import transform as tr
from ..ops.kla.carry import adjoint_to_info, apply_adjoint_map, chunk_transforms, end_adjoint_maps
from ..ops.kla_core import default_state, state_dtype
from .sharding import MODEL_CP_LAYOUT, check_layout, chunk_ids, num_chunks

State = Tuple[torch.Tensor, torch.Tensor]


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class _Segment:
    """A run of one sequence (batch row) or document inside one local chunk."""

    start: int  # local offsets inside the chunk
    end: int
    doc: int  # document index (packed) or -1 (all batch rows)
    starts_here: bool  # the sequence starts at ``start``: its state resets to the initial state
    ends_here: bool  # the sequence's last token is ``end - 1``: this rank owns its final state


@dataclass(frozen=True)
class _Piece:
    """One local chunk: global chunk index, its local slice and its segments."""

    chunk: int
    local: slice
    segments: Tuple[_Segment, ...]

    @property
    def local_cu_seqlens(self) -> List[int]:
        return [s.start for s in self.segments] + [self.segments[-1].end]


def _plan(L_local: int, cp_rank: int, cp_size: int, layout: str, cu_seqlens: Optional[List[int]]):
    ids = chunk_ids(cp_rank, cp_size, layout)
    n = num_chunks(cp_size, layout)
    if L_local % len(ids):
        raise ValueError(f"cp_kla_scan: local length {L_local} must be divisible by {len(ids)} ({layout} order)")
    size = L_local // len(ids)
    if cu_seqlens is not None and cu_seqlens[-1] != size * n:
        raise ValueError(
            f"cp_kla_scan: cu_seqlens must be the global offsets of the full packed sequence "
            f"(ending at {size * n} = local length {L_local} × CP {cp_size}), got last offset {cu_seqlens[-1]}"
        )
    pieces = []
    for i, c in enumerate(ids):
        g0, g1 = c * size, (c + 1) * size
        if cu_seqlens is None:
            segs = (_Segment(0, size, -1, c == 0, c == n - 1),)
        else:
            segs = []
            for d, (s, e) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
                if s < g1 and e > g0:
                    segs.append(_Segment(max(s, g0) - g0, min(e, g1) - g0, d, s >= g0, e <= g1))
            segs = tuple(segs)
        pieces.append(_Piece(c, slice(i * size, (i + 1) * size), segs))
    return pieces


# --------------------------------------------------------------------------- communication


def _exchange(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``x`` over the CP group: returns ``[CP, *x.shape]`` (the only collective
    of the carry protocol; tests replace it to prove the carries matter)."""
    x = x.contiguous()
    out = x.new_empty((dist.get_world_size(group), *x.shape))
    if dist.get_backend(group) == dist.Backend.NCCL:
        dist.all_gather_into_tensor(out, x, group=group)
    else:
        dist.all_gather(list(out.unbind(0)), x, group=group)
    return out


def _by_chunk(gathered: torch.Tensor, cp_size: int, layout: str) -> List[torch.Tensor]:
    """``[CP, pieces, ...]`` -> list indexed by global chunk."""
    out = [None] * num_chunks(cp_size, layout)
    for r in range(cp_size):
        for i, c in enumerate(chunk_ids(r, cp_size, layout)):
            out[c] = gathered[r, i]
    return out


# --------------------------------------------------------------------------- per-chunk pieces


def _carry_ops(backend: str, device: torch.device):
    """(chunk_transforms, end_adjoint_maps): the Triton kernels where the local scan runs on
    Triton (same signatures, fp32), else the PyTorch versions (any device, fp64-capable)."""
    if device.type == "cuda" and backend in ("auto", "triton") and triton_available():
        from ..ops.kla.chunk_carry import triton_chunk_transforms, triton_end_adjoint_maps

        return triton_chunk_transforms, triton_end_adjoint_maps
    return chunk_transforms, end_adjoint_maps



def _slice(x, piece: _Piece, seg: Optional[_Segment] = None):
    x = x[:, piece.local]
    return x if seg is None else x[:, seg.start : seg.end]


def _initial_rows(lam0, eta0, doc):
    return (lam0, eta0) if doc < 0 else (lam0[doc : doc + 1], eta0[doc : doc + 1])


def _piece_transform(piece: _Piece, vlv, lambda_v, k, a, p, lam0, eta0, transforms=chunk_transforms):
    """The chunk's transform, as seen by later chunks: the part after its last reset."""
    last = piece.segments[-1]
    t = transforms(_slice(vlv, piece, last), _slice(lambda_v, piece, last), _slice(k, piece, last), a, p)
    if last.starts_here:
        t = tr.compose(t, tr.reset(*(s.to(t.dtype) for s in _initial_rows(lam0, eta0, last.doc))))
    return t


def _piece_start_state(piece: _Piece, carry: State, lam0, eta0):
    """Initial state of each local segment: the carry, or the sequence's own initial state."""
    rows = []
    for seg in piece.segments:
        rows.append(_initial_rows(lam0, eta0, seg.doc) if seg.starts_here else tuple(c.to(lam0.dtype) for c in carry))
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def _final_grads(piece: _Piece, d_final: Optional[State], like: torch.Tensor):
    """Cotangents on each local segment's last state owned by this rank (``(d_lam, d_eta)``
    rows), zeros where the sequence continues on another rank."""
    d_lam, d_eta = torch.zeros_like(like), torch.zeros_like(like)
    if d_final is None:
        return d_lam, d_eta
    for i, seg in enumerate(piece.segments):
        if seg.ends_here:
            src = slice(None) if seg.doc < 0 else slice(seg.doc, seg.doc + 1)
            dst = slice(None) if seg.doc < 0 else slice(i, i + 1)
            if d_final[0] is not None:
                d_lam[dst] += d_final[0][src].to(like.dtype)
            if d_final[1] is not None:
                d_eta[dst] += d_final[1][src].to(like.dtype)
    return d_lam, d_eta


def _piece_adjoint_map(piece, v, lambda_v, k, q, a, p, gy, gv, start: State, d_final_rows: State,
                       adjoint_maps=end_adjoint_maps):
    """(Q, o) of the chunk as seen by earlier chunks: only its first segment, if that one
    continues a sequence from the previous chunk."""
    seg = piece.segments[0]
    if seg.starts_here:
        shape = (start[0].shape[0] if seg.doc < 0 else 1, *a.shape)
        zeros = start[0].new_zeros(shape)
        return torch.stack([zeros] * 3), torch.stack([zeros] * 2)
    args = [_slice(x, piece, seg) for x in (v, lambda_v, k, q)] + [a, p] + [_slice(g, piece, seg) for g in (gy, gv)]
    grad_final = tuple(d[:1] if seg.doc >= 0 else d for d in d_final_rows) if seg.ends_here else None
    q_map, o = adjoint_maps(*args, tuple(s.to(start[0].dtype) for s in start), grad_final_state=grad_final)
    if len(piece.segments) > 1:
        q_map = torch.zeros_like(q_map)  # the chunk's end belongs to a later document
    return q_map, o


# --------------------------------------------------------------------------- autograd


class _CPKLAScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, lambda_v, k, q, a, p, lam0, eta0, group, layout, cu_list, backend, want_final, track):
        cp_size, cp_rank = dist.get_world_size(group), dist.get_rank(group)
        pieces = _plan(v.shape[1], cp_rank, cp_size, layout, cu_list)
        work_dtype = state_dtype(a)

        # 1-2. transforms of the local chunks, one all-gather.
        transforms, _ = _carry_ops(backend, v.device)
        vlv = v * lambda_v
        local_t = torch.stack([_piece_transform(pc, vlv, lambda_v, k, a, p, lam0, eta0, transforms) for pc in pieces])
        by_chunk = _by_chunk(_exchange(local_t.to(work_dtype), group), cp_size, layout)

        # 3. exclusive prefix in global chunk order; chunk 0 starts with a reset, so the
        #    placeholder state (1, 0) never reaches a result.
        mine = {pc.chunk: pc for pc in pieces}
        starts, prefix = {}, None
        for c, t in enumerate(by_chunk):
            if c in mine:
                state = default_state(t[0].shape, dtype=t.dtype, device=t.device)
                starts[c] = state if prefix is None else tr.apply(prefix, *state)
            if c == max(mine):
                break
            prefix = t if prefix is None else tr.compose(t, prefix)

        # 4. local scans from the exact start states, keeping their graphs for the backward.
        # ``track`` is False under no_grad (evaluation): no graph is kept then.
        inputs = (v, lambda_v, k, q, a, p, lam0, eta0)
        leaves = [x.detach().requires_grad_(track and need) for x, need in zip(inputs, ctx.needs_input_grad)]
        lv0, le0 = leaves[6], leaves[7]
        outs, starts_used = [], []
        with torch.set_grad_enabled(track):
            for pc in pieces:
                init = _piece_start_state(pc, starts[pc.chunk], lv0, le0)
                cu = None if cu_list is None else torch.tensor(pc.local_cu_seqlens, device=v.device)
                y, y_var, (lam_f, eta_f) = kla_scan(
                    *(_slice(x, pc) for x in leaves[:4]), leaves[4], leaves[5], initial_state=init,
                    output_final_state=True, cu_seqlens=cu, backend=backend, check_values=False,
                )
                outs.append((y, y_var, lam_f, eta_f))
                starts_used.append(starts[pc.chunk])

        ctx.pieces, ctx.outs, ctx.leaves, ctx.starts = pieces, outs, leaves, starts_used
        ctx.group, ctx.layout, ctx.saved_inputs = group, layout, (v, lambda_v, k, q, a, p)
        ctx.backend = backend
        y = torch.cat([o[0] for o in outs], dim=1).detach()
        y_var = torch.cat([o[1] for o in outs], dim=1).detach()
        if not want_final:
            return y, y_var, None, None
        lam_f, eta_f = _owned_final_states(pieces, outs, lam0.shape[0], group)
        return y, y_var, lam_f, eta_f

    @staticmethod
    def backward(ctx, gy, gv, d_lam_f, d_eta_f):
        group, layout, pieces, outs = ctx.group, ctx.layout, ctx.pieces, ctx.outs
        cp_size = dist.get_world_size(group)
        v, lambda_v, k, q, a, p = ctx.saved_inputs
        gy = torch.zeros_like(v) if gy is None else gy
        gv = torch.zeros_like(v) if gv is None else gv
        d_final = None if d_lam_f is None and d_eta_f is None else (d_lam_f, d_eta_f)
        final_rows = [_final_grads(pc, d_final, out[2].detach()) for pc, out in zip(pieces, outs)]

        # 1-2. end-adjoint maps of the local chunks, one all-gather.
        _, adjoint_maps = _carry_ops(ctx.backend, v.device)
        maps = [
            _piece_adjoint_map(pc, v, lambda_v, k, q, a, p, gy, gv, start, rows, adjoint_maps)
            for pc, start, rows in zip(pieces, ctx.starts, final_rows)
        ]
        local = torch.stack([torch.cat([m[0], m[1]]) for m in maps])
        by_chunk = _by_chunk(_exchange(local, group), cp_size, layout)

        # 3. suffix compose: the adjoint at the end of each chunk, from all later chunks.
        c_end, ends = torch.zeros_like(by_chunk[-1][:2]), {}
        for c in range(len(by_chunk) - 1, min(pc.chunk for pc in pieces) - 1, -1):
            ends[c] = c_end
            c_end = apply_adjoint_map(by_chunk[c][:3], by_chunk[c][3:], c_end)

        # 4. local backward with the true end adjoints.
        out_tensors, out_grads = [], []
        for pc, (y, y_var, lam_f, eta_f), (d_lam, d_eta) in zip(pieces, outs, final_rows):
            c = ends[pc.chunk]
            carried = adjoint_to_info(c, lam_f[-c.shape[1]:].detach().to(c.dtype), eta_f[-c.shape[1]:].detach().to(c.dtype))
            d_lam[-c.shape[1]:] += carried[0].to(d_lam.dtype)
            d_eta[-c.shape[1]:] += carried[1].to(d_eta.dtype)
            out_tensors += [y, y_var, lam_f, eta_f]
            out_grads += [_slice(gy, pc).to(y.dtype), _slice(gv, pc).to(y.dtype), d_lam, d_eta]
        wanted = [x for x in ctx.leaves if x.requires_grad]
        grads = iter(torch.autograd.grad(out_tensors, wanted, out_grads, allow_unused=True))
        result = []
        for x in ctx.leaves:
            g = next(grads) if x.requires_grad else None
            result.append(torch.zeros_like(x) if (g is None and x.requires_grad) else g)
        ctx.outs = ctx.leaves = None
        return (*result, None, None, None, None, None, None)


def _owned_final_states(pieces, outs, n_rows, group):
    """Final states of the sequences this rank ends, summed over the group so that every rank
    returns the full final state (the owner's gradient is the one used in the backward)."""
    lam_ref = outs[0][2]
    lam = lam_ref.new_zeros((n_rows, *lam_ref.shape[1:]))
    eta = torch.zeros_like(lam)
    for pc, (_, _, lam_f, eta_f) in zip(pieces, outs):
        for i, seg in enumerate(pc.segments):
            if seg.ends_here:
                dst = slice(None) if seg.doc < 0 else slice(seg.doc, seg.doc + 1)
                src = slice(None) if seg.doc < 0 else slice(i, i + 1)
                lam[dst] = lam_f[src].detach()
                eta[dst] = eta_f[src].detach()
    both = torch.stack([lam, eta])
    dist.all_reduce(both, group=group)
    return both[0], both[1]


# --------------------------------------------------------------------------- public


def cp_kla_scan(
    v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    *,
    cp_group,
    layout: str = MODEL_CP_LAYOUT,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
):
    """``kla_scan`` over a sequence sharded across the context-parallel group ``cp_group``.

    Args:
        v, lambda_v: ``[B, L_local, H, P]``; k, q: ``[B, L_local, H, S]`` — this rank's shard
            (``sharding.shard`` order for ``layout``).
        a, p: ``[H, P, S]``, identical on every rank.
        cp_group: the CP process group (``parallel_state.get_context_parallel_group()``).
        layout: ``"contiguous"`` or ``"load_balanced"`` (see :mod:`.sharding`).
        initial_state: ``(lam, eta)`` ``[N, H, P, S]``, identical on every rank; default λ = 1, η = 0.
        output_final_state: also return the final state of each sequence (identical on every
            rank; in the backward, each row's gradient is taken from the rank holding the
            sequence's last token, so compute a loss on it identically on all ranks or on that rank).
        cu_seqlens: ``[N + 1]`` **global** offsets of the documents in the full packed sequence
            (B = 1), identical on every rank; documents may cross shard boundaries.
        backend: the local ``kla_scan`` backend.

    Returns:
        ``(y, y_var, final_state)`` as ``kla_scan``, ``y``/``y_var`` for the local shard.

    Gradients: ``v, lambda_v, k, q`` for the local shard; ``a``, ``p`` and the initial state
    are this rank's contributions (the initial state's rows nonzero only on the rank holding
    the sequence start) — sum them over the CP group, as the DP+CP gradient reduction does.
    """
    check_layout(layout)
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return kla_scan(
            v, lambda_v, k, q, a, p, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens, backend=backend, check_values=False,
        )
    B, _, H, P = v.shape
    S = k.shape[-1]
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cp_kla_scan: with cu_seqlens the batch size must be 1 (packed), got B={B}")
    cu_list = None if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    n_seq = B if cu_list is None else len(cu_list) - 1
    if initial_state is None:
        lam0, eta0 = default_state((n_seq, H, P, S), dtype=a.dtype, device=a.device)
    else:
        lam0, eta0 = initial_state
        if tuple(lam0.shape) != (n_seq, H, P, S) or tuple(eta0.shape) != (n_seq, H, P, S):
            raise ValueError(
                f"cp_kla_scan: initial_state must be two [N={n_seq}, H, P, S] tensors, "
                f"got {tuple(lam0.shape)}, {tuple(eta0.shape)}"
            )
    y, y_var, lam_f, eta_f = _CPKLAScan.apply(
        v, lambda_v, k, q, a, p, lam0, eta0, cp_group, layout, cu_list, backend, output_final_state,
        torch.is_grad_enabled(),
    )
    return y, y_var, ((lam_f, eta_f) if output_final_state else None)
