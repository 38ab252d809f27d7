"""Megatron (TP = PP = 1 state dict) ↔ Hugging Face parameter names, and the two configs.

One table per layer kind; every name maps one to one and tensors are copied unchanged (the HF
model keeps megatron's fused layouts: in_proj [z | gate], fc1 [gate | up], grouped QKV), so
conversion can never interleave or permute anything. TP/PP layouts never reach this module:
megatron dist checkpointing merges and splits shards (``megatron_io``).
"""
from __future__ import annotations

import re
from typing import Dict

import torch

from kla_megatron.models import KLAModelConfig

MODEL_NAMES = {  # megatron -> HF
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_norm.weight": "model.norm_f.weight",
    "decoder.final_norm.bias": "model.norm_f.bias",
    "output_layer.weight": "lm_head.weight",
}
LAYER_NAMES = {  # pattern symbol -> {megatron suffix: HF suffix}; mixer.* is copied as is
    "K": {"norm.weight": "norm.weight", "norm.bias": "norm.bias"},
    "*": {
        "input_layernorm.weight": "norm.weight",
        "input_layernorm.bias": "norm.bias",
        "self_attention.linear_qkv.weight": "attn.qkv_proj.weight",
        "self_attention.linear_proj.weight": "attn.o_proj.weight",
    },
    "-": {
        "pre_mlp_layernorm.weight": "norm.weight",
        "pre_mlp_layernorm.bias": "norm.bias",
        "mlp.linear_fc1.weight": "mlp.fc1.weight",
        "mlp.linear_fc2.weight": "mlp.fc2.weight",
    },
}
_LAYER_RE = re.compile(r"(decoder\.layers|model\.layers)\.(\d+)\.(.+)")

# KLAModelConfig keys (flat YAML names) that do not describe the trained function: the run-facing
# name, and what only shapes the initial weights or the optimizer. Every other key is architecture:
# the HF config carries it (same name, except init_std → initializer_range), checkpoints and
# init_from compare it. tests/test_config_tree.py fails when a new field is in one and not the other.
NOT_ARCHITECTURE = ("name", "init_std", "ssm_lr_mult", "dt_min", "dt_max", "dt_init_floor", "p_init",
                    "lambda_skip_init")
HF_INIT_STD = "initializer_range"
ARCHITECTURE_KEYS = tuple(k for k in KLAModelConfig.flat_keys() if k not in NOT_ARCHITECTURE)


def architecture_fields(cfg: KLAModelConfig) -> dict:
    """The architecture keys of a config (flat YAML names) and their values."""
    flat = cfg.to_flat()
    return {k: flat[k] for k in ARCHITECTURE_KEYS}


def hf_config_dict(cfg: KLAModelConfig) -> dict:
    """The architecture fields of ``KLAConfig`` for a ``KLAModelConfig``."""
    return {**architecture_fields(cfg), HF_INIT_STD: cfg.init_std}


def model_config_from_hf(hf_config) -> KLAModelConfig:
    """``KLAModelConfig`` from a ``KLAConfig`` (or its dict)."""
    data = hf_config if isinstance(hf_config, dict) else hf_config.to_dict()
    missing = [name for name in ARCHITECTURE_KEYS if name not in data]
    if missing:
        raise ValueError(f"HF config is not a KLA config: missing fields {missing}")
    kw = {name: data[name] for name in ARCHITECTURE_KEYS}
    kw.update(name=data.get("name_or_path") or "kla", init_std=data.get(HF_INIT_STD, 0.02))
    return KLAModelConfig.from_dict(kw, "HF config")


def check_same_architecture(a: KLAModelConfig, b: KLAModelConfig, what: str) -> None:
    """ValueError listing every architecture field on which the two configs differ."""
    x, y = architecture_fields(a), architecture_fields(b)
    diff = {n: (x[n], y[n]) for n in x if x[n] != y[n]}
    if diff:
        raise ValueError(f"config mismatch ({what}): " + ", ".join(f"{k}: {v!r} != {w!r}" for k, (v, w) in diff.items()))


def _rename(name: str, pattern: str, to_hf: bool) -> str:
    table = MODEL_NAMES if to_hf else {v: k for k, v in MODEL_NAMES.items()}
    if name in table:
        return table[name]
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(1) != ("decoder.layers" if to_hf else "model.layers"):
        raise KeyError(f"unexpected parameter {name!r} (not a {'megatron' if to_hf else 'HF'} KLA model name)")
    index, rest = int(match.group(2)), match.group(3)
    if index >= len(pattern):
        raise KeyError(f"parameter {name!r}: layer {index} is beyond the {len(pattern)}-layer pattern {pattern!r}")
    symbol = pattern[index]
    prefix = "model.layers" if to_hf else "decoder.layers"
    if symbol == "K" and rest.startswith("mixer."):
        return f"{prefix}.{index}.{rest}"
    table = LAYER_NAMES[symbol] if to_hf else {v: k for k, v in LAYER_NAMES[symbol].items()}
    if rest not in table:
        raise KeyError(f"parameter {name!r} does not belong to a {symbol!r} layer (layer {index} of {pattern!r})")
    return f"{prefix}.{index}.{table[rest]}"


def hf_name(megatron_name: str, pattern: str) -> str:
    """The HF name of one megatron (TP = PP = 1, global layer number) parameter name."""
    return _rename(megatron_name, pattern, True)


def megatron_to_hf(state: Dict[str, torch.Tensor], pattern: str) -> Dict[str, torch.Tensor]:
    """TP = PP = 1 megatron state dict → HF state dict (``_extra_state`` entries dropped)."""
    return {_rename(k, pattern, True): v for k, v in state.items() if not k.endswith("_extra_state")}


def hf_to_megatron(state: Dict[str, torch.Tensor], pattern: str) -> Dict[str, torch.Tensor]:
    """HF state dict → TP = PP = 1 megatron state dict (without ``_extra_state`` entries)."""
    return {_rename(k, pattern, False): v for k, v in state.items()}


def shape_mismatch(have: Dict[str, tuple], want: Dict[str, tuple]):
    """How two name → shape maps disagree: (wanted names absent, names not wanted, sorted
    ``(name, have shape, wanted shape)`` of the names both hold with different shapes)."""
    both = sorted(set(have) & set(want))
    return (sorted(set(want) - set(have)), sorted(set(have) - set(want)),
            [(k, have[k], want[k]) for k in both if have[k] != want[k]])


def check_state_dict(state: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], what: str) -> None:
    """ValueError naming missing, unexpected and mis-shaped tensors (``expected``: name → tensor)."""
    missing, unexpected, differ = shape_mismatch({k: tuple(v.shape) for k, v in state.items()},
                                                 {k: tuple(v.shape) for k, v in expected.items()})
    shapes = [f"{k}: {have} != expected {want}" for k, have, want in differ]
    problems = []
    if missing:
        problems.append(f"missing tensors {missing}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected}")
    if shapes:
        problems.append("mis-shaped tensors [" + "; ".join(shapes) + "]")
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))
