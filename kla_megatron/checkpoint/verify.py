"""Run two models on the same tokens: max |logit difference| and mean KL(p_a ‖ p_b)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from kla_megatron.models import KLAModelConfig

from . import ranks
from .megatron_io import build_model, load_into


def random_tokens(vocab_size: int, batch: int = 2, seq_len: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def _megatron_logits(source, cfg: KLAModelConfig, tokens, dtype):
    model = build_model(cfg, 1, 1, dtype)
    if isinstance(source, dict):
        model.load_state_dict(source, strict=False)
    else:
        load_into(model, source)
    model.eval()
    with torch.no_grad():
        return model(tokens, None, None).float()


def megatron_logits(source, cfg: KLAModelConfig, tokens, dtype=torch.float32) -> torch.Tensor:
    """Logits [b, s, V] of our megatron model from a dist checkpoint dir or a TP = 1 state dict."""
    return ranks.run(_megatron_logits, 1, (source if isinstance(source, dict) else str(source), cfg, tokens, dtype))


def hf_logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens, use_cache=False).logits.float()


def compare(logits_a: torch.Tensor, logits_b: torch.Tensor) -> Dict[str, float]:
    if logits_a.shape != logits_b.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_a.shape)} vs {tuple(logits_b.shape)}")
    a, b = logits_a.double().log_softmax(-1), logits_b.double().log_softmax(-1)
    kl = F.kl_div(b, a, log_target=True, reduction="none").sum(-1).mean()
    return {"max_abs_logit_diff": (logits_a.double() - logits_b.double()).abs().max().item(),
            "kl": kl.item(), "argmax_agreement": (logits_a.argmax(-1) == logits_b.argmax(-1)).double().mean().item()}
