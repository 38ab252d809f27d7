"""The one place that maps the paper's reference ``kla`` v0.1.0 parameter names onto ours.

Reference ``KLALayer`` (H = 1)           ours ``KLAMixer`` (TP = 1 layout)
  in_proj.weight      [2·M, D] (z|gate)  in_proj.weight   [2·M, D] (same order)
  conv.weight         [M, 1, K]          conv_weight      [M, 1, K]
  conv.bias           [M]                conv_bias        [M]
  sensor_proj.weight  [O, M]             sensor_weight    [1, O, M]   (O = w_v + w_var + 2S)
  var_expand.weight   [M, r]   (mamba)   var_expand       [1, M, r]
  delta               [M, S]             delta_raw        [1, M, S]   (pre-softplus Δ)
  lambda_log          [M, S]             A_log            [1, M, S]
  process_noise       [M, S]             p                [1, M, S]
  lambda_skip         []                 lambda_skip      []
  out_proj.weight     [D, M]             out_proj.weight  [D, M]

Reference ``SequenceModel``                ours ``KLAModel`` (pattern "K-" per block, or "K"
                                           per block when the reference has mlp="none")
  embedding.weight                         embedding.word_embeddings.weight
  blocks.i.mixer_norm.weight               decoder.layers.<K index>.norm.weight
  blocks.i.mixer.<name>                    decoder.layers.<K index>.mixer.<mixer name>
  blocks.i.mlp_norm.weight                 decoder.layers.<K index + 1>.pre_mlp_layernorm.weight
  blocks.i.mlp.w12.weight  [2F, D] gate|up decoder.layers.<K index + 1>.mlp.linear_fc1.weight
  blocks.i.mlp.w3.weight                   decoder.layers.<K index + 1>.mlp.linear_fc2.weight
  norm_f.weight                            decoder.final_norm.weight
  lm_head.weight                           output_layer.weight (absent when tied)

Only H = 1 models correspond to the reference (it has one k and q shared by all channels).
These maps produce TP = 1 state dicts; other layouts go through dist checkpointing.
"""
from __future__ import annotations

import re
from typing import Dict

import torch

# reference mixer name -> (our mixer name, adds a leading head axis of size 1)
MIXER_NAMES = {
    "in_proj.weight": ("in_proj.weight", False),
    "conv.weight": ("conv_weight", False),
    "conv.bias": ("conv_bias", False),
    "sensor_proj.weight": ("sensor_weight", True),
    "var_expand.weight": ("var_expand", True),
    "delta": ("delta_raw", True),
    "lambda_log": ("A_log", True),
    "process_noise": ("p", True),
    "lambda_skip": ("lambda_skip", False),
    "out_proj.weight": ("out_proj.weight", False),
}
MODEL_NAMES = {
    "embedding.weight": "embedding.word_embeddings.weight",
    "norm_f.weight": "decoder.final_norm.weight",
    "lm_head.weight": "output_layer.weight",
}
MLP_NAMES = {
    "mlp_norm.weight": "pre_mlp_layernorm.weight",
    "mlp.w12.weight": "mlp.linear_fc1.weight",
    "mlp.w3.weight": "mlp.linear_fc2.weight",
}


def mixer_from_reference(ref: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Reference ``KLALayer`` state dict → our ``KLAMixer`` state dict (H = 1, TP = 1)."""
    out = {}
    for name, tensor in ref.items():
        if name not in MIXER_NAMES:
            raise KeyError(f"unknown reference KLALayer parameter {name!r}; known: {sorted(MIXER_NAMES)}")
        ours, add_head = MIXER_NAMES[name]
        out[ours] = tensor.unsqueeze(0) if add_head else tensor
    return out


def model_from_reference(ref: Dict[str, torch.Tensor], has_mlp: bool = True) -> Dict[str, torch.Tensor]:
    """Reference ``SequenceModel`` state dict → our ``KLAModel`` state dict (TP = PP = 1).

    Block i becomes layer ``2i`` (KLA) and ``2i + 1`` (MLP) when ``has_mlp``, else layer i."""
    out, per_block = {}, 2 if has_mlp else 1
    mixers: Dict[int, Dict[str, torch.Tensor]] = {}
    for name, tensor in ref.items():
        if name in MODEL_NAMES:
            out[MODEL_NAMES[name]] = tensor
            continue
        match = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if match is None:
            raise KeyError(f"unknown reference SequenceModel parameter {name!r}")
        block, rest = int(match.group(1)), match.group(2)
        kla = per_block * block
        if rest.startswith("mixer."):
            mixers.setdefault(kla, {})[rest[len("mixer."):]] = tensor
        elif rest == "mixer_norm.weight":
            out[f"decoder.layers.{kla}.norm.weight"] = tensor
        elif rest in MLP_NAMES and has_mlp:
            out[f"decoder.layers.{kla + 1}.{MLP_NAMES[rest]}"] = tensor
        else:
            raise KeyError(f"unknown reference SequenceModel parameter {name!r}")
    for layer, params in mixers.items():
        for ours, tensor in mixer_from_reference(params).items():
            out[f"decoder.layers.{layer}.mixer.{ours}"] = tensor
    return out
