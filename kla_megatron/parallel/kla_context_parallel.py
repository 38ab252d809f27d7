"""What context parallelism changes in a KLA mixer, as one object the mixer always calls.

megatron-core's Mamba mixer hands its CP work to a helper (``MambaContextParallel``); so does
``KLAMixer``. At CP = 1 every method is the plain single-rank operation, so the mixer holds the
math only and has no ``if cp_size > 1`` branches. Under CP (docs/kla.md#context-parallelism):

- packing: ``cu_seqlens`` are global offsets over the whole sequence, and each local token's
  position inside its document is sliced from the global map (``sharding.shard`` order);
- conv: each local chunk gets the K − 1 inputs before it from the rank holding them (halo);
- scan: the chunk transforms are exchanged and each rank starts from the carried state.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from kla_megatron.ops.kla import kla_scan
from kla_megatron.ops.packing import position_in_document

from .context_parallel import cp_kla_scan
from .conv_halo import cp_causal_conv
from .sharding import MODEL_CP_LAYOUT, shard


class KLAContextParallel:
    """The CP side of one KLA mixer: ``cp_group`` None (or of size 1) means no context parallelism."""

    def __init__(self, cp_group=None, layout: str = MODEL_CP_LAYOUT):
        self.group = cp_group
        self.size = cp_group.size() if cp_group is not None else 1
        self.rank = cp_group.rank() if cp_group is not None else 0
        self.layout = layout

    def packing(self, packed_seq_params, b: int, s_local: int, device, check: bool = True):
        """``(cu_seqlens, position_in_doc [s_local])`` of this rank's tokens, or ``(None, None)``
        when the batch is not packed; ``check`` validates ``cu_seqlens`` on the host."""
        if packed_seq_params is None:
            return None, None
        if b != 1:
            raise ValueError(f"KLAMixer: packed sequences need micro-batch size 1 (b=1), got b={b}")
        s = s_local * self.size
        cu = packed_seq_params.cu_seqlens_q
        if check and int(cu[-1]) != s:
            raise ValueError(f"KLAMixer: cu_seqlens must end at the sequence length {s}, got {cu.tolist()}")
        cu = cu.to(device=device, dtype=torch.long)
        positions = position_in_document(cu, s)
        if self.size > 1:
            positions = shard(positions[None], self.rank, self.size, self.layout)[0]
        return cu, positions

    def conv(self, conv_fn: Callable, z: torch.Tensor, kernel_size: int, window: Optional[torch.Tensor],
             position_in_doc: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``conv_fn`` (``KLAMixer.causal_conv``) over this rank's tokens: ``(out, new window)``;
        under CP the window comes from the previous chunk's rank and no window is returned."""
        if self.size == 1:
            return conv_fn(z, window, position_in_doc)
        if window is not None:
            raise ValueError("KLAMixer: inference_state is not supported under context parallelism (set cp=1)")
        out = cp_causal_conv(conv_fn, z, kernel_size=kernel_size, cp_group=self.group, layout=self.layout,
                             position_in_doc=position_in_doc)
        return out, None

    def scan(self, v, lambda_v, k, q, a, p, *, output_variance: bool = True, **kwargs):
        """``kla_scan`` over the whole (sharded) sequence; kwargs as ``kla_scan``'s."""
        if self.size == 1:
            return kla_scan(v, lambda_v, k, q, a, p, check_values=False, output_variance=output_variance, **kwargs)
        # the carry exchange composes transforms in the inputs' dtype: keep it fp32
        v, lambda_v, k, q = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
                             for x in (v, lambda_v, k, q))
        return cp_kla_scan(v, lambda_v, k, q, a, p, cp_group=self.group, layout=self.layout, **kwargs)
