"""How a sequence is cut into context-parallel shards, and the data path's shard function.

Two orders (``layout``):

- ``"contiguous"``: the sequence is cut into CP equal chunks; rank r holds chunk r.
- ``"load_balanced"``: megatron-core's order for causal attention: the sequence is cut into
  2·CP equal chunks and rank r holds chunks r and 2·CP−1−r, concatenated in that order
  (``megatron.training.utils.get_batch_on_this_cp_rank`` does the same).

Every rank's local tensor is the concatenation of its chunks ("pieces"), each of length
L_local / pieces_per_rank.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch

LAYOUTS = ("contiguous", "load_balanced")
# The order KLA models use under CP: megatron's, so attention layers and the data path agree.
MODEL_CP_LAYOUT = "load_balanced"


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"context parallel layout must be one of {LAYOUTS}, got {layout!r}")


def num_chunks(cp_size: int, layout: str) -> int:
    """Number of global chunks the sequence is cut into."""
    check_layout(layout)
    return cp_size if layout == "contiguous" else 2 * cp_size


def chunk_ids(cp_rank: int, cp_size: int, layout: str) -> List[int]:
    """Global chunk indices held by ``cp_rank``, in local order."""
    check_layout(layout)
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must lie in [0, {cp_size}), got {cp_rank}")
    return [cp_rank] if layout == "contiguous" else [cp_rank, 2 * cp_size - 1 - cp_rank]


def shard(x: torch.Tensor, cp_rank: int, cp_size: int, layout: str, seq_dim: int = 1) -> torch.Tensor:
    """This rank's part of a full-length tensor along ``seq_dim``."""
    n = num_chunks(cp_size, layout)
    length = x.shape[seq_dim]
    if length % n:
        raise ValueError(
            f"sequence length {length} must be divisible by {n} chunks "
            f"(context_parallel_size={cp_size}, layout={layout!r}); pad the sequence"
        )
    chunks = x.chunk(n, dim=seq_dim)
    return torch.cat([chunks[c] for c in chunk_ids(cp_rank, cp_size, layout)], dim=seq_dim)


def unshard(shards: List[torch.Tensor], layout: str, seq_dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's shard (list indexed by rank)."""
    cp_size = len(shards)
    n = num_chunks(cp_size, layout)
    pieces: Dict[int, torch.Tensor] = {}
    for r, x in enumerate(shards):
        ids = chunk_ids(r, cp_size, layout)
        for c, part in zip(ids, x.chunk(len(ids), dim=seq_dim)):
            pieces[c] = part
    return torch.cat([pieces[c] for c in range(n)], dim=seq_dim)


# Keys of a megatron-style batch that are not sharded: packed-document offsets are global.
_GLOBAL_KEYS = ("cu_seqlens", "cu_seqlens_padded", "max_seqlen")


def get_cp_shard(
    batch: Dict[str, Optional[torch.Tensor]], cp_rank: int, cp_size: int, layout: str = MODEL_CP_LAYOUT
) -> Dict[str, Optional[torch.Tensor]]:
    """Give this CP rank its part of a batch (the data path calls this after loading).

    ``batch`` maps names to ``[b, s]`` tensors (tokens, labels, loss_mask, position_ids, ...)
    or None; ``attention_mask`` ``[b, 1, s, s]`` is sharded along its query axis (dim 2) as in
    megatron. ``cu_seqlens`` / ``max_seqlen`` (packed documents) stay global: the KLA
    context-parallel scan reads the global offsets on every rank. Returns a new dict.
    """
    if cp_size == 1:
        return dict(batch)
    out = {}
    for key, val in batch.items():
        if val is None or key in _GLOBAL_KEYS or not torch.is_tensor(val) or val.dim() < 2:
            out[key] = val
        else:
            out[key] = shard(val, cp_rank, cp_size, layout, seq_dim=2 if key == "attention_mask" else 1)
    return out
