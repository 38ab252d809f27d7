"""RMSNorm / LayerNorm for the local (no Transformer Engine) specs, sequence-parallel safe and
memory-lean.

megatron's ``WrappedTorchNorm`` refuses ``sequence_parallel=True``; a per-token norm is
exact under SP as long as its weight gradients are summed over the TP group, which
``finalize_model_grads`` does for parameters tagged ``sequence_parallel`` (as TE/apex norms
are). Signature matches what megatron layers pass: ``(config, hidden_size, eps)``.

Math is fp32 for fp16/bf16 inputs (the input's own dtype otherwise) and the output is cast
back to the input dtype. For backward only the input itself is kept (:class:`_LeanNorm`): the
fp32 copy and the normalised activations are recomputed from it (one fused
``F.rms_norm`` / ``F.layer_norm`` forward + backward on CUDA), instead of autograd keeping
fp32 copies of x, x², x·rstd, ... (≈ 24 KB per token per norm at D = 2048 before).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _norm(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """RMSNorm (``bias`` None) or LayerNorm of ``h`` in ``h``'s dtype (fused kernels on CUDA)."""
    shape = h.shape[-1:]
    if bias is None:
        return F.rms_norm(h, shape, weight, eps)
    return F.layer_norm(h, shape, weight, bias, eps)


class _LeanNorm(torch.autograd.Function):
    """Norm in the compute dtype that saves only its input; backward recomputes."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.eps = eps
        ctx.save_for_backward(x, weight, bias)
        dt = _compute_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            y = _norm(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt), eps)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        dt = _compute_dtype(x.dtype)
        leaves = [x.detach().to(dt), weight.detach().to(dt), None if bias is None else bias.detach().to(dt)]
        wanted = [i for i, t in enumerate(leaves) if t is not None and ctx.needs_input_grad[i]]
        for i in wanted:
            leaves[i].requires_grad_(True)
        grads = [None, None, None]
        if wanted:
            with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
                y = _norm(*leaves, ctx.eps)
                found = torch.autograd.grad(y, [leaves[i] for i in wanted], grad.to(dt))
            originals = (x, weight, bias)
            for i, g in zip(wanted, found):
                grads[i] = g.to(originals[i].dtype)
        return grads[0], grads[1], grads[2], None


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
        return _LeanNorm.apply(x, self.weight, self.bias, self.eps)
