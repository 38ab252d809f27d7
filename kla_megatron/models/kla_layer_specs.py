"""Layer specs for KLA and hybrid stacks, built only from megatron-core modules that work
without Transformer Engine (local ColumnParallelLinear / RowParallelLinear, core
SelfAttention, MLP), our SP-safe ``KLANorm`` and our core attention (flash kernels, packed
documents and CP without TE; TE's core when TE is installed: ``cp_core_attention``).

``layer_specs(cfg)`` maps each pattern symbol to its spec; the stack looks symbols up in
that dict (a new layer kind is a new entry, not a new branch).
"""
from __future__ import annotations

from typing import Dict, Optional

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from kla_megatron.layers import (KLALayer, KLALayerSubmodules, KLAMixer, KLAMixerConfig, KLAMixerSubmodules, KLANorm,
                                 KLARuntimeConfig)
from kla_megatron.parallel.cp_attention import cp_core_attention


def kla_layer_spec(mixer_config: KLAMixerConfig, runtime: Optional[KLARuntimeConfig] = None) -> ModuleSpec:
    return ModuleSpec(
        module=KLALayer,
        submodules=KLALayerSubmodules(
            norm=KLANorm,
            mixer=ModuleSpec(
                module=KLAMixer,
                params={"mixer_config": mixer_config, "runtime": runtime},
                submodules=KLAMixerSubmodules(in_proj=ColumnParallelLinear, out_proj=RowParallelLinear),
            ),
            bda=get_bias_dropout_add,
        ),
    )


def attention_layer_spec() -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=KLANorm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=cp_core_attention,  # TE's core if installed, else CoreAttention
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
        ),
    )


def mlp_layer_spec() -> ModuleSpec:
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=KLANorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


def layer_specs(cfg, runtime: Optional[KLARuntimeConfig] = None) -> Dict[str, ModuleSpec]:
    """Pattern symbol → layer spec for a ``KLAModelConfig`` run with ``runtime``."""
    return {"K": kla_layer_spec(cfg.mixer, runtime), "*": attention_layer_spec(), "-": mlp_layer_spec()}
