"""Causal-conv halo for context parallelism: each local chunk receives the previous chunk's
last (kernel − 1) pre-conv inputs, and their gradient flows back to the rank that owns them.

The conv itself stays in the mixer (``KLAMixer.causal_conv``): this helper only supplies each
chunk's window, so the mixer's math is the same at every CP size. No parameters, never
checkpointed. One all-gather of ``[pieces, b, M, K−1]`` per layer forward and one all-reduce of
the same size backward (halos are tiny next to the activations).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from kla_megatron.ops.packing import position_in_document

from .sharding import MODEL_CP_LAYOUT, check_layout, chunk_ids, num_chunks, shard

ConvFn = Callable[[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]


def _source_slots(cp_rank: int, cp_size: int, layout: str):
    """For each local chunk, the (rank, piece) holding the chunk before it (None for chunk 0)."""
    slot = {c: (r, i) for r in range(cp_size) for i, c in enumerate(chunk_ids(r, cp_size, layout))}
    return [slot.get(c - 1) for c in chunk_ids(cp_rank, cp_size, layout)]


class _HaloExchange(torch.autograd.Function):
    """tails ``[pieces, b, M, K-1]`` of the local chunks -> the window of each local chunk
    (zeros before chunk 0). Every rank calls the backward (each output is always used), which
    sums the windows' gradients back into their owners' tails with one all-reduce."""

    @staticmethod
    def forward(ctx, tails, group, layout):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        gathered = tails.new_empty((size, *tails.shape))
        dist.all_gather(list(gathered.unbind(0)), tails.contiguous(), group=group)
        ctx.group, ctx.sources = group, _source_slots(rank, size, layout)
        return torch.stack([torch.zeros_like(tails[0]) if s is None else gathered[s] for s in ctx.sources])

    @staticmethod
    def backward(ctx, grad):
        size, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        full = grad.new_zeros((size, *grad.shape))
        for i, s in enumerate(ctx.sources):
            if s is not None:
                full[s] += grad[i]
        dist.all_reduce(full, group=ctx.group)
        return full[rank], None, None


def cp_causal_conv(
    conv_fn: ConvFn,
    x: torch.Tensor,
    *,
    kernel_size: int,
    cp_group,
    layout: str = MODEL_CP_LAYOUT,
    position_in_doc: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run a causal conv over this rank's shard as if over the whole sequence.

    Args:
        conv_fn: ``conv_fn(x_chunk [b, n, M], window [b, M, K-1], position_in_doc [n] or None)
            -> (y [b, n, M], new_window)``, e.g. ``KLAMixer.causal_conv``.
        x: ``[b, L_local, M]`` pre-conv inputs of this rank's shard (``sharding.shard`` order).
        kernel_size: the conv width K; every local chunk must hold at least K − 1 tokens.
        cp_group: the CP process group.
        layout: ``"contiguous"`` or ``"load_balanced"``.
        position_in_doc: ``[L_local]`` position of each local token inside its packed document,
            from the **global** offsets (:func:`cp_position_in_doc`); None when not packed.

    Returns:
        ``[b, L_local, M]`` conv outputs for the shard.
    """
    check_layout(layout)
    cp_size, cp_rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    ids = chunk_ids(cp_rank, cp_size, layout)
    n = x.shape[1] // len(ids)
    halo = kernel_size - 1
    if n < halo:
        raise ValueError(f"cp_causal_conv: each local chunk ({n} tokens) must hold at least kernel-1 = {halo} tokens")
    chunks = x.split(n, dim=1)
    if halo == 0:
        windows = [None] * len(ids)
    else:
        tails = torch.stack([c[:, n - halo :].transpose(1, 2) for c in chunks])  # [pieces, b, M, K-1]
        windows = _HaloExchange.apply(tails, cp_group, layout).unbind(0)
    pos = [None] * len(ids) if position_in_doc is None else position_in_doc.split(n)
    return torch.cat([conv_fn(c, w, pp)[0] for c, w, pp in zip(chunks, windows, pos)], dim=1)


def cp_position_in_doc(cu_seqlens: torch.Tensor, cp_rank: int, cp_size: int, layout: str) -> torch.Tensor:
    """``[L_local]`` position of each of this rank's tokens inside its document, from global
    ``cu_seqlens`` (a document start inside a chunk cuts the conv's taps there)."""
    length = int(cu_seqlens[-1])
    if length % num_chunks(cp_size, layout):
        raise ValueError(f"global packed length {length} must be divisible by {num_chunks(cp_size, layout)}")
    return shard(position_in_document(cu_seqlens)[None], cp_rank, cp_size, layout)[0]
