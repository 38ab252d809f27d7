"""A Transformer-Engine-free attention core that supports context parallelism itself.

megatron-core's local ``DotProductAttention`` asserts CP = 1 (only ``TEDotProductAttention``
does CP). :class:`CPDotProductAttention` takes its place as the ``core_attention`` submodule
of a ``SelfAttention`` spec: it all-gathers K and V over the CP group (autograd sends their
gradients back), masks causally by **global** token positions in the shard order (megatron's
load-balanced order by default), and calls PyTorch's ``scaled_dot_product_attention``.

Packed documents (``packed_seq_params.cu_seqlens_q``, global offsets) add a same-document mask.
Memory is O(s_local × s_global) per head for the mask and scores on CPU/fallback kernels: this
is the portable path for hybrid models under CP without TE, not a replacement for ring attention.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from .sharding import shard, unshard


class _GatherSeq(torch.autograd.Function):
    """All-gather ``[s_local, ...]`` shards into the global order; backward returns the sum
    of every rank's gradient for this rank's shard."""

    @staticmethod
    def forward(ctx, x, group, layout):
        ctx.group, ctx.layout = group, layout
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return unshard(parts, layout, seq_dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        rank, size = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        return shard(grad, rank, size, ctx.layout, seq_dim=0), None, None


def _global_positions(s_local: int, group, layout: str, device) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return torch.arange(s_local, device=device)
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    return shard(torch.arange(s_local * size, device=device)[None], rank, size, layout)[0]


def _mask_rows(attention_mask: torch.Tensor, q_pos: torch.Tensor, s_global: int) -> torch.Tensor:
    """Megatron mask (True = masked), ``[.., s_global, s_global]`` (global, e.g. the model's
    packed-document mask) or ``[.., s_local, s_global]`` (already sharded by the data path),
    as ``[b or 1, 1, s_local, s_global]`` rows for this rank's queries."""
    mask = attention_mask.bool()
    if mask.shape[-1] != s_global:
        raise ValueError(
            f"CPDotProductAttention: attention_mask must cover all {s_global} keys of the sequence, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if mask.shape[-2] == s_global and s_global != q_pos.numel():
        mask = mask.index_select(-2, q_pos)
    elif mask.shape[-2] != q_pos.numel() and mask.shape[-2] != s_global:
        raise ValueError(f"CPDotProductAttention: attention_mask has {mask.shape[-2]} query rows, expected "
                         f"{q_pos.numel()} (local) or {s_global} (global)")
    while mask.dim() < 4:
        mask = mask[None]
    return mask


def cp_rotary_embedding(rope, local_length: int, cp_group, layout: str = "load_balanced") -> torch.Tensor:
    """RoPE table ``[s_local, 1, 1, d]`` for this rank's tokens: megatron's own CP slicing
    (``get_pos_emb_on_this_cp_rank``) moves indices to CUDA, so slice here instead."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return rope(local_length)
    size, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    return shard(rope.get_emb(local_length * size), rank, size, layout, seq_dim=0)


def cp_core_attention(config, layer_number, attn_mask_type, attention_type, **kwargs):
    """``core_attention`` for a SelfAttention spec: megatron's local ``DotProductAttention``
    at CP = 1 (unchanged numerics), :class:`CPDotProductAttention` under CP without TE."""
    if config.context_parallel_size > 1:
        return CPDotProductAttention(config, layer_number, attn_mask_type, attention_type, **kwargs)
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    return DotProductAttention(config, layer_number, attn_mask_type, attention_type, **kwargs)


class CPDotProductAttention(MegatronModule):
    """Core attention ``[sq, b, np, hn]`` q and ``[sk, b, ng, hn]`` k, v -> ``[sq, b, np·hn]``,
    with the sequence sharded over the CP group (constructor signature of megatron's
    ``DotProductAttention``; no parameters)."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        cp_layout: str = "load_balanced",
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CPDotProductAttention: only causal attention is supported, got {attn_mask_type}")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_layout = cp_layout
        tp = pg_collection.tp.size()
        self.heads_local = config.num_attention_heads // tp
        self.groups_local = (config.num_query_groups or config.num_attention_heads) // tp
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if getattr(config, "window_size", None) is not None:
            raise ValueError("CPDotProductAttention: sliding-window attention is not supported; unset window_size")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("CPDotProductAttention: only softmax_type='vanilla' is supported")

    def _cp_size(self) -> int:
        return 1 if self.cp_group is None else dist.get_world_size(self.cp_group)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("CPDotProductAttention: attention_bias is not supported")
        sq, b, n_heads, hn = query.shape
        if self._cp_size() > 1:
            key = _GatherSeq.apply(key, self.cp_group, self.cp_layout)
            value = _GatherSeq.apply(value, self.cp_group, self.cp_layout)
        q_pos = _global_positions(sq, self.cp_group, self.cp_layout, query.device)
        k_pos = torch.arange(key.shape[0], device=query.device)
        mask = k_pos[None, :] <= q_pos[:, None]  # [sq, sk], True = attend
        if attention_mask is not None:
            mask = mask & ~_mask_rows(attention_mask, q_pos, key.shape[0])
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q.to(query.device).long()
            if int(cu[-1]) != key.shape[0]:
                raise ValueError(f"CPDotProductAttention: cu_seqlens must end at the global length {key.shape[0]}, got {int(cu[-1])}")
            doc = torch.searchsorted(cu, k_pos, right=True) - 1
            mask = mask & (doc[q_pos][:, None] == doc[None, :])
        rep = n_heads // key.shape[2]
        if rep > 1:
            key = key.repeat_interleave(rep, dim=2)
            value = value.repeat_interleave(rep, dim=2)
        # [s, b, h, d] -> [b, h, s, d]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, scale=self.softmax_scale
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * hn)
