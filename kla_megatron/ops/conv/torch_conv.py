"""Causal depthwise conv1d in plain PyTorch: the CPU and float64 path of :func:`causal_conv1d`.

Shapes: x ``[B, L, M]``, weight ``[M, K]``, bias ``[M]``, window ``[B, M, K-1]`` (the K-1
inputs before x, oldest first), position_in_doc ``[L]``; y ``[B, L, M]``.

One shifted multiply-add per tap (``KLAMixer.causal_conv``'s loop), accumulated in fp32 (fp64
for fp64 inputs) like the Triton kernels, so both backends round once, at the output.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def new_window(x: torch.Tensor, window: Optional[torch.Tensor], K: int) -> torch.Tensor:
    """The last K-1 inputs of ``[window | x]`` as a contiguous ``[B, M, K-1]`` in x's dtype
    (its own memory: an inference state must not keep the whole of x alive)."""
    B, L, M = x.shape
    xt = x.transpose(1, 2)
    if L >= K - 1:
        return xt[..., L - (K - 1):].contiguous()
    prev = window[..., L:].to(x.dtype) if window is not None else x.new_zeros(B, M, K - 1 - L)
    return torch.cat([prev, xt], dim=-1)


def torch_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    window: Optional[torch.Tensor] = None,
    position_in_doc: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """PyTorch backend of :func:`kla_megatron.ops.conv.causal_conv1d` (inputs already checked)."""
    B, L, M = x.shape
    K = weight.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = weight.reshape(M, K).to(dtype)
    past = window.to(dtype) if window is not None else x.new_zeros(B, M, K - 1, dtype=dtype)
    padded = torch.cat([past.transpose(1, 2), x.to(dtype)], dim=1)  # [B, K-1+L, M]
    y = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype, device=x.device)
    for lag in range(K):
        tap = padded[:, K - 1 - lag : K - 1 - lag + L] * w[:, K - 1 - lag]
        if position_in_doc is not None and lag > 0:
            tap = tap * (position_in_doc >= lag).to(dtype)[None, :, None]
        y = y + tap
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), new_window(x, window, K)
