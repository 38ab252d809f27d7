"""The core attention of the hybrid models' ``*`` layers (``core_attention`` of megatron's
``SelfAttention``): no s×s mask or score tensor, packed documents, context parallelism
without Transformer Engine, and TE's own core where TE is installed.

:func:`cp_core_attention` builds the module. Environment variable ``KLA_CORE_ATTENTION``:
``auto`` (default: TE if importable on a CUDA machine, else local), ``te`` (TE or an error),
``local`` (:class:`CoreAttention` always).

- **TE** (NGC images): megatron's ``TEDotProductAttention``, taken from megatron's TE spec
  provider and subclassed (:func:`te_core_attention_class`) so that the two inputs TE would
  read differently from this module go to the local core instead: documents passed in
  ``sbhd`` packing (:func:`attention_packing`; TE would treat their ``cu_seqlens`` as padded
  batch rows) and a caller's dense ``attention_mask`` (TE ignores it for a causal layer). TE
  does its own CP (ring/p2p) in megatron's load-balanced order, the order KLA models use.
- **local** :class:`CoreAttention`, ``[s, b, h, d]`` q and ``[s, b, g, d]`` k, v (GQA: g
  divides h) -> ``[s, b, h·d]``. Kernels, by case:

  ========================================  =======================================  ===========================
  case                                      CUDA (bf16 / fp16)                        CPU
  ========================================  =======================================  ===========================
  CP = 1, no documents                      SDPA ``is_causal=True``, ``enable_gqa``:  SDPA -> CPU flash kernel
                                            flash (or cuDNN / memory-efficient;       (GQA native)
                                            K/V repeated for GQA when not flash)
  documents (``cu_seqlens_q``)              ``torch.nn.attention.varlen.varlen_attn``  per-document SDPA
                                            (flash varlen, causal), GQA native        ``is_causal`` loop
  CP > 1 (K, V all-gathered)                per local chunk: SDPA with                same; torch builds the
                                            ``causal_lower_right`` (flash's           chunk's lower-right mask
                                            bottom-right causal) against the key      on CPU
                                            prefix; documents: varlen per chunk
  caller's ``attention_mask``               dense-mask SDPA (O(s_local·s_global))     same
  ========================================  =======================================  ===========================

  varlen is used on CUDA for fp16/bf16, head dim ≤ 256 and a multiple of 8, and no dropout
  (``varlen_attn`` has no dropout); otherwise the per-document loop, which keeps every kernel
  mask-free (each document is a causal block). flex_attention was not chosen: its kernels
  need ``torch.compile`` (eager flex materialises the scores) and a block mask rebuilt per
  micro-batch, while varlen is flash-attention's own document kernel, eager, in torch ≥ 2.10
  (``is_causal=True`` there, ``window_size=(-1, 0)`` from 2.11; both handled). Not timed
  against flex here (no GPU in this session).

Context parallelism: the sequence is cut into chunks (megatron's load-balanced order: rank r
holds global chunks r and 2·CP−1−r; or contiguous). K and V are all-gathered (autograd sends
their gradients back); each local query chunk ``[a, a+n)`` attends to the key prefix
``[0, a+n)`` with bottom-right-aligned causal masking: one exact softmax per row (no partial
results to merge), flash on GPU, and each rank's work is balanced in the load-balanced order.
Documents (global ``cu_seqlens``) cut each chunk into segments; a segment attends to its own
document's keys, which are contiguous in the prefix, so one varlen call covers a chunk.

Semantics kept from megatron's ``DotProductAttention``: ``softmax_scale`` (default
1/√head_dim; ``apply_query_key_layer_scaling``'s coefficient cancels there and is not applied
here), ``attention_dropout`` (or the constructor's override) in training only, drawn from the
model-parallel RNG tracker unless sequence parallel, as megatron does; softmax in fp32 inside
the kernels. A caller's ``attention_mask`` (True = masked) is combined with the causal mask.
Unsupported (clear error): non-causal / cross attention, sliding windows, non-vanilla
softmax, attention_bias, qk-clip, padded documents, megatron's ``thd`` packing under CP (its
RoPE shards each document separately; pass documents with :func:`attention_packing`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import math
import os
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from torch.nn.attention.bias import causal_lower_right

from kla_megatron.ops.packing import document_ids

from .sharding import MODEL_CP_LAYOUT, check_layout, chunk_ids, shard, unshard

BACKEND_ENV = "KLA_CORE_ATTENTION"
BACKENDS = ("auto", "te", "local")


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


def cp_rotary_embedding(rope, local_length: int, cp_group, layout: str = MODEL_CP_LAYOUT) -> torch.Tensor:
    """RoPE table ``[s_local, 1, 1, d]`` for this rank's tokens: megatron's own CP slicing
    (``get_pos_emb_on_this_cp_rank``) moves indices to CUDA, so slice here instead."""
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return rope(local_length)
    size, rank = dist.get_world_size(cp_group), dist.get_rank(cp_group)
    return shard(rope.get_emb(local_length * size), rank, size, layout, seq_dim=0)


def attention_packing(packed_seq_params):
    """The ``PackedSeqParams`` a KLA model hands its ``*`` layers for packed documents: the
    same global ``cu_seqlens`` with ``qkv_format="sbhd"``, so megatron's ``Attention`` keeps
    ``[s, b, h, d]`` tensors and the model's global RoPE positions (its ``"thd"`` path squeezes
    the batch and restarts RoPE per document on TE's per-document CP layout). The core reads
    ``cu_seqlens_q``; RoPE being relative, attention within a document is the same either way."""
    return dataclasses.replace(packed_seq_params, qkv_format="sbhd")


# ---------------------------------------------------------------------------- selection


def te_attention_base():
    """megatron's ``TEDotProductAttention`` (via its TE spec provider) when Transformer Engine
    imports on a CUDA machine, else None."""
    if not torch.cuda.is_available():
        return None
    try:
        from megatron.core.extensions import transformer_engine as te_ext
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    except Exception:  # TE present but broken: the local core still works
        return None
    if not getattr(te_ext, "HAVE_TE", False):
        return None
    return TESpecProvider().core_attention()


@functools.lru_cache(maxsize=None)
def te_core_attention_class(base):
    """``base`` (TEDotProductAttention) with the inputs TE reads differently routed to the
    local core: documents in ``sbhd`` packing and a caller's dense mask (see module doc)."""

    class TECoreAttention(base):
        def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                     softmax_scale=None, cp_comm_type=None, pg_collection=None, **kwargs):
            super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout=attention_dropout,
                             softmax_scale=softmax_scale, cp_comm_type=cp_comm_type, pg_collection=pg_collection,
                             **kwargs)
            # Parameter-free: adds nothing to the state dict (TE's keys stay megatron's).
            self.local = CoreAttention(config, layer_number, attn_mask_type, attention_type,
                                       attention_dropout=attention_dropout, softmax_scale=softmax_scale,
                                       pg_collection=pg_collection)

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, **kwargs):
            documents = packed_seq_params is not None and query.dim() == 4  # [s, b, h, d] + cu_seqlens
            if documents or attention_mask is not None:
                return self.local(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                  attention_bias=attention_bias, packed_seq_params=packed_seq_params)
            return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                   attention_bias=attention_bias, packed_seq_params=packed_seq_params, **kwargs)

    TECoreAttention.__name__ = TECoreAttention.__qualname__ = "TECoreAttention"
    return TECoreAttention


def cp_core_attention(config, layer_number, attn_mask_type, attention_type, **kwargs):
    """``core_attention`` for a SelfAttention spec: TE's core when Transformer Engine is
    importable (``KLA_CORE_ATTENTION=auto``/``te``), else :class:`CoreAttention`, at any CP."""
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {BACKENDS}, got {choice!r}")
    base = None if choice == "local" else te_attention_base()
    if choice == "te" and base is None:
        raise RuntimeError(f"{BACKEND_ENV}=te, but Transformer Engine is not importable on a CUDA machine")
    if base is not None:
        return te_core_attention_class(base)(config, layer_number, attn_mask_type, attention_type, **kwargs)
    return CoreAttention(config, layer_number, attn_mask_type, attention_type, **kwargs)


# ---------------------------------------------------------------------------- kernels


def causal_block(q, k, v, scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention of ``q`` ``[n, b, h, d]`` against ``k``, ``v`` ``[m, b, g, d]``
    (m ≥ n) where the queries are the last n key positions (bottom-right alignment).
    Returns ``[n, b, h, d]``. No mask tensor on CUDA; GQA without copies."""
    n, m = q.shape[0], k.shape[0]
    qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
    gqa = qq.shape[1] != kk.shape[1]
    if gqa and qq.is_cuda and not _flash_takes_gqa(qq, kk, vv, dropout, n == m):
        # Only flash (and math) read GQA natively; repeated K/V let the memory-efficient
        # kernel serve instead of a materialised mask (O(s·d) copies, never O(s²)).
        kk, vv = (t.repeat_interleave(qq.shape[1] // kk.shape[1], dim=1) for t in (kk, vv))
        gqa = False
    if n == m:
        out = F.scaled_dot_product_attention(qq, kk, vv, dropout_p=dropout, is_causal=True, scale=scale,
                                             enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=causal_lower_right(n, m), dropout_p=dropout,
                                             scale=scale, enable_gqa=gqa)
    return out.permute(2, 0, 1, 3)


def _flash_takes_gqa(q, k, v, dropout: float, is_causal: bool) -> bool:
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    return can_use_flash_attention(SDPAParams(q, k, v, None, dropout, is_causal, True))


@functools.lru_cache(maxsize=None)
def varlen_kernel():
    """(``varlen_attn``, causal kwargs, supports enable_gqa) or None (torch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def use_varlen(q: torch.Tensor, dropout: float) -> bool:
    """Whether the flash varlen kernel serves this call (else the per-document loop)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 and d % 8 == 0
            and d <= 256 and varlen_kernel() is not None)


def varlen_block(q, k, v, cu_q: List[int], cu_k: List[int], scale: float) -> torch.Tensor:
    """Flash varlen causal attention: ``q`` ``[n, b, h, d]`` cut into segments by ``cu_q``,
    each attending bottom-right-causally to its segment of ``k``, ``v`` ``[m, b, g, d]`` (cut
    by ``cu_k``). The same offsets apply to every batch row. Returns ``[n, b, h, d]``."""
    fn, causal, has_gqa = varlen_kernel()
    n, b, h, d = q.shape
    m, g = k.shape[0], k.shape[2]
    if g != h and not has_gqa:
        k, v = (t.repeat_interleave(h // g, dim=2) for t in (k, v))
        g = h
    rows_q = [x + r * n for r in range(b) for x in cu_q[:-1]] + [b * n]
    rows_k = [x + r * m for r in range(b) for x in cu_k[:-1]] + [b * m]
    max_q = max(y - x for x, y in zip(cu_q[:-1], cu_q[1:]))
    max_k = max(y - x for x, y in zip(cu_k[:-1], cu_k[1:]))
    dev = q.device
    flat = lambda t, s, heads: t.transpose(0, 1).reshape(b * s, heads, d)  # noqa: E731
    kwargs = dict(causal, scale=scale)
    if g != h:
        kwargs["enable_gqa"] = True
    out = fn(flat(q, n, h), flat(k, m, g), flat(v, m, g), torch.tensor(rows_q, dtype=torch.int32, device=dev),
             torch.tensor(rows_k, dtype=torch.int32, device=dev), max_q, max_k, **kwargs)
    return out.view(b, n, h, d).transpose(0, 1)


def documents_block(q, k, v, start: int, cu: List[int], scale: float, dropout: float) -> torch.Tensor:
    """Queries at global positions ``[start, start+n)`` against the global keys ``k``, ``v``
    (at least ``start+n`` long), each query seeing the earlier keys of its own document
    (``cu``: global document offsets). ``[n, b, h, d]``."""
    n = q.shape[0]
    end = start + n
    # Segments (query begin, query end, document begin) of the documents overlapping the chunk.
    segments = [(max(a, start), min(z, end), a) for a, z in zip(cu[:-1], cu[1:]) if a < end and z > start]
    if use_varlen(q, dropout):
        first = segments[0][2]
        cu_q = [0] + [qe - start for _, qe, _ in segments]
        cu_k = [0] + [qe - first for _, qe, _ in segments]
        return varlen_block(q, k[first:end], v[first:end], cu_q, cu_k, scale)
    outs = [causal_block(q[qb - start : qe - start], k[a:qe], v[a:qe], scale, dropout) for qb, qe, a in segments]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def document_offsets(packed_seq_params, total: int) -> Optional[List[int]]:
    """Global document offsets as a host list (cached on the tensor: one device sync per
    micro-batch, not per layer), validated against the global length ``total``."""
    if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
        return None
    for name in ("cu_seqlens_q_padded", "cu_seqlens_kv_padded"):
        padded = getattr(packed_seq_params, name)
        if padded is not None and padded is not packed_seq_params.cu_seqlens_q:
            raise ValueError(f"CoreAttention: padded documents ({name}) are not supported")
    if packed_seq_params.cp_group is not None or packed_seq_params.local_cp_size is not None:
        raise ValueError("CoreAttention: dynamic context parallelism (PackedSeqParams.cp_group/local_cp_size) "
                         "is not supported")
    cu = packed_seq_params.cu_seqlens_q
    cached = getattr(cu, "_kla_host_offsets", None)
    if cached is None or cached[0] != cu._version:
        cached = (cu._version, [int(x) for x in cu.tolist()])
        cu._kla_host_offsets = cached
    offsets = cached[1]
    if offsets[0] != 0 or offsets[-1] != total or any(b < a for a, b in zip(offsets[:-1], offsets[1:])):
        raise ValueError(f"CoreAttention: cu_seqlens must rise from 0 to the global length {total}, "
                         f"got {offsets}")
    kv = packed_seq_params.cu_seqlens_kv
    if kv is not None and kv is not cu and kv.numel() != cu.numel():
        raise ValueError("CoreAttention: self-attention needs cu_seqlens_kv equal to cu_seqlens_q")
    return offsets


def local_pieces(s_local: int, group, layout: str) -> List[Tuple[int, int, int]]:
    """(local start, global start, length) of each chunk this rank holds."""
    if group is None or dist.get_world_size(group) == 1:
        return [(0, 0, s_local)]
    ids = chunk_ids(dist.get_rank(group), dist.get_world_size(group), layout)
    if s_local % len(ids):
        raise ValueError(f"CoreAttention: local length {s_local} is not a multiple of {len(ids)} chunks")
    n = s_local // len(ids)
    return [(i * n, c * n, n) for i, c in enumerate(ids)]


# ---------------------------------------------------------------------------- module


class CoreAttention(MegatronModule):
    """Causal self-attention core, TE-free, at any CP size (see the module doc). Constructor
    signature of megatron's ``DotProductAttention`` plus ``cp_layout``; no parameters."""

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,  # K/V are all-gathered whatever the type
        pg_collection=None,
        cp_layout: str = MODEL_CP_LAYOUT,
    ):
        super().__init__(config=config)
        if attn_mask_type != AttnMaskType.causal:
            raise ValueError(f"CoreAttention: only causal attention is supported, got {attn_mask_type}")
        if attention_type != "self":
            raise ValueError(f"CoreAttention: only self-attention is supported, got {attention_type!r}")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("CoreAttention: sliding-window attention is not supported; unset window_size")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError("CoreAttention: only softmax_type='vanilla' is supported")
        if getattr(config, "qk_clip", False) or getattr(config, "log_max_attention_logit", False):
            raise ValueError("CoreAttention: qk_clip / log_max_attention_logit need Transformer Engine")
        check_layout(cp_layout)
        if pg_collection is None and config.context_parallel_size > 1:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"])
        self.cp_group = getattr(pg_collection, "cp", None)
        self.cp_layout = cp_layout
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(config.kv_channels)
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def _cp_size(self) -> int:
        return 1 if self.cp_group is None else dist.get_world_size(self.cp_group)

    def _rng(self, dropout: float):
        """megatron's dropout RNG: the model-parallel tracker unless sequence parallel."""
        if dropout == 0.0 or self.config.sequence_parallel:
            return contextlib.nullcontext()
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker().fork()

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
            raise ValueError("CoreAttention: attention_bias is not supported")
        if attn_mask_type not in (None, AttnMaskType.causal):
            raise ValueError(f"CoreAttention: only causal attention is supported, got {attn_mask_type}")
        thd = query.dim() == 3  # megatron's "thd" path squeezed the batch: [t, heads, d], one sequence
        if thd:
            if self._cp_size() > 1:
                raise ValueError("CoreAttention: megatron's 'thd' packing under CP shards every document "
                                 "separately (RoPE too); pass documents with attention_packing() instead")
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
        if key.shape[2] == 0 or query.shape[2] % key.shape[2]:
            raise ValueError(f"CoreAttention: {query.shape[2]} query heads are not a multiple of "
                             f"{key.shape[2]} key/value heads")
        dropout = self.dropout if self.training else 0.0
        with self._rng(dropout):
            out = self._attend(query, key, value, attention_mask, packed_seq_params, dropout)
        s, b = out.shape[:2]
        return out.reshape(s, -1) if thd else out.reshape(s, b, -1)

    def _attend(self, q, k, v, attention_mask, packed_seq_params, dropout):
        if self._cp_size() > 1:
            k = _GatherSeq.apply(k, self.cp_group, self.cp_layout)
            v = _GatherSeq.apply(v, self.cp_group, self.cp_layout)
        cu = document_offsets(packed_seq_params, k.shape[0])
        if attention_mask is not None:
            return self._dense(q, k, v, attention_mask, cu, dropout)
        outs = []
        for local, start, n in local_pieces(q.shape[0], self.cp_group, self.cp_layout):
            qi = q[local : local + n]
            if cu is None:
                outs.append(causal_block(qi, k[: start + n], v[: start + n], self.softmax_scale, dropout))
            else:
                outs.append(documents_block(qi, k, v, start, cu, self.softmax_scale, dropout))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)

    def _dense(self, q, k, v, attention_mask, cu, dropout):
        """A caller's dense mask (True = masked) & causal & same document, as one SDPA mask."""
        s_global = k.shape[0]
        q_pos = torch.cat([torch.arange(start, start + n, device=q.device)
                           for _, start, n in local_pieces(q.shape[0], self.cp_group, self.cp_layout)])
        k_pos = torch.arange(s_global, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if cu is not None:
            doc = document_ids(torch.tensor(cu, device=q.device), k_pos)
            allowed = allowed & (doc[q_pos][:, None] == doc[None, :])
        allowed = allowed & ~_mask_rows(attention_mask, q_pos, s_global)
        qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed, dropout_p=dropout,
                                             scale=self.softmax_scale, enable_gqa=qq.shape[1] != kk.shape[1])
        return out.permute(2, 0, 1, 3)


def _mask_rows(attention_mask: torch.Tensor, q_pos: torch.Tensor, s_global: int) -> torch.Tensor:
    """Megatron mask (True = masked), ``[.., s_global, s_global]`` (global, e.g. the model's
    packed-document mask) or ``[.., s_local, s_global]`` (already sharded by the data path),
    as ``[b or 1, 1, s_local, s_global]`` rows for this rank's queries."""
    mask = attention_mask.bool()
    if mask.shape[-1] != s_global:
        raise ValueError(
            f"CoreAttention: attention_mask must cover all {s_global} keys of the sequence, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    if mask.shape[-2] == s_global and s_global != q_pos.numel():
        mask = mask.index_select(-2, q_pos)
    elif mask.shape[-2] != q_pos.numel() and mask.shape[-2] != s_global:
        raise ValueError(f"CoreAttention: attention_mask has {mask.shape[-2]} query rows, expected "
                         f"{q_pos.numel()} (local) or {s_global} (global)")
    while mask.dim() < 4:
        mask = mask[None]
    return mask
