"""Packed sequences: which document each token belongs to, and where inside it.

Several documents packed into one row are described, as in flash-attention and megatron-core's
``PackedSeqParams``, by ``cu_seqlens`` ``[N+1]``: the offsets of the documents' starts and of
the row's end. The conv (taps stop at a document start), the scan (the state restarts) and
attention (no attention across documents) all need these two maps.
"""
from __future__ import annotations

from typing import Optional

import torch


def document_ids(cu_seqlens: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Index of the document holding each position (default: every position ``0 … cu_seqlens[-1]-1``)."""
    cu = cu_seqlens.long()
    if positions is None:
        positions = torch.arange(int(cu[-1]), device=cu.device)
    return torch.searchsorted(cu, positions, right=True) - 1


def position_in_document(cu_seqlens: torch.Tensor, length: Optional[int] = None) -> torch.Tensor:
    """``[length]`` each token's offset from the start of its document; ``length`` defaults to
    ``cu_seqlens[-1]`` (pass it when known: reading it is a host sync, a graph break under
    torch.compile)."""
    cu = cu_seqlens.long()
    positions = torch.arange(int(cu[-1]) if length is None else length, device=cu.device)
    return positions - cu[document_ids(cu, positions)]
