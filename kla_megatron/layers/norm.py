"""RMSNorm / LayerNorm for the local (no Transformer Engine) specs, sequence-parallel safe.

megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``; a per-token norm is
exact under SP as long as its weight gradients are summed over the TP group, which
``finalize_model_grads`` does for parameters tagged ``sequence_parallel`` (as TE/apex norms
are). Signature matches what megatron layers pass: ``(config, hidden_size, eps)``.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class KLANorm(torch.nn.Module):
    """``config.normalization`` "RMSNorm" (x·rsqrt(mean x² + eps)·w) or "LayerNorm"."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        if config.normalization not in ("RMSNorm", "LayerNorm"):
            raise ValueError(f"KLANorm: normalization must be 'RMSNorm' or 'LayerNorm', got {config.normalization!r}")
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
            param.no_weight_decay = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        if self.rms:
            h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + self.eps)
            return (h * self.weight.to(h.dtype)).to(dtype)
        h = torch.nn.functional.layer_norm(h, h.shape[-1:], self.weight.to(h.dtype), self.bias.to(h.dtype), self.eps)
        return h.to(dtype)
