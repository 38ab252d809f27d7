"""Analytic parameter and FLOP counts for ``KLAModelConfig`` (for configs and MFU).

``num_parameters`` is checked against instantiated models in ``tests/test_model_features.py``.
FLOPs count a multiply-add as 2; training = 3 × forward (backward ≈ 2 × forward), the
usual MFU convention. Attention score/value products count the full (non-causal) sequence,
as Megatron's and PaLM's MFU formulas do. A KLA layer's scan costs ``SCAN_FLOPS_PER_ELEMENT``
per (token, channel, state) lane in the forward: the information-form update (9: φ, r, d, λ⁻, α,
λ, η) and read-out (6: μ, σ, y, yvar), with ā² time-invariant and so not counted per token; the
derivation and its op-by-op check are in ``tests/test_model_config.py``, as is the check of the
matmul terms against ``torch.utils.flop_counter.FlopCounterMode`` on a real model.
"""
from __future__ import annotations


SCAN_FLOPS_PER_ELEMENT = 15


def _sensor_width(cfg) -> int:
    """Per-head sensor projection outputs (plus the mamba variance expansion's rank)."""
    mc = cfg.mixer
    P = cfg.d_inner // mc.num_heads
    if mc.preset == "plain":
        return 2 * P + 2 * mc.d_state
    rank = mc.resolved_var_rank(cfg.hidden_size) // mc.num_heads
    return 2 * rank + 2 * mc.d_state  # rank outputs + the [P, rank] expansion per head


def _norm_params(cfg) -> int:
    return cfg.hidden_size * (1 if cfg.normalization == "RMSNorm" else 2)


def _kla_matmul_params(cfg) -> int:
    D, di = cfg.hidden_size, cfg.d_inner
    return 2 * di * D + di * _sensor_width(cfg) + di * D


def _attention_matmul_params(cfg) -> int:
    D = cfg.hidden_size
    head_dim = D // cfg.num_attention_heads
    kv = (cfg.num_query_groups or cfg.num_attention_heads) * head_dim
    return D * (D + 2 * kv) + D * D


def _mlp_matmul_params(cfg) -> int:
    return cfg.hidden_size * cfg.ffn_hidden_size * (3 if cfg.swiglu else 2)


def layer_parameters(cfg, symbol: str) -> int:
    if symbol == "K":
        di, S = cfg.d_inner, cfg.mixer.d_state
        return _norm_params(cfg) + _kla_matmul_params(cfg) + di * (cfg.mixer.conv_kernel + 1) + 3 * di * S + 1
    if symbol == "*":
        return _norm_params(cfg) + _attention_matmul_params(cfg)
    if symbol == "-":
        return _norm_params(cfg) + _mlp_matmul_params(cfg)
    raise ValueError(f"unknown layer symbol {symbol!r}")


def num_parameters(cfg) -> int:
    """Trainable parameters of the whole model (unpadded vocabulary)."""
    embed = cfg.vocab_size * cfg.hidden_size
    head = 0 if cfg.tie_embeddings else embed
    return embed + head + _norm_params(cfg) + sum(layer_parameters(cfg, c) for c in cfg.layer_pattern)


def forward_flops_per_token(cfg, seq_len: int) -> int:
    D, di = cfg.hidden_size, cfg.d_inner
    per_symbol = {
        "K": 2 * _kla_matmul_params(cfg) + 2 * di * cfg.mixer.conv_kernel + SCAN_FLOPS_PER_ELEMENT * di * cfg.mixer.d_state,
        "*": 2 * _attention_matmul_params(cfg) + 4 * seq_len * D,
        "-": 2 * _mlp_matmul_params(cfg),
    }
    return sum(per_symbol[c] for c in cfg.layer_pattern) + 2 * D * cfg.vocab_size


def flops_per_token(cfg, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token at sequence length ``seq_len``."""
    return 3 * forward_flops_per_token(cfg, seq_len)
