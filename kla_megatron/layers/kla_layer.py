"""One KLA layer: ``x + mixer(norm(x))``; the mixer computes, the layer only wraps.

Shape contract: ``hidden_states`` ``[s, b, h]`` in and out (``[s/TP, b, h]`` under sequence
parallelism). Returns ``(hidden_states, None)`` like megatron's ``TransformerLayer`` so a
hybrid stack can call every layer the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig

from .inference_state import KLAInferenceState


@dataclass
class KLALayerSubmodules:
    norm: Union[ModuleSpec, type] = IdentityOp
    mixer: Union[ModuleSpec, type] = IdentityOp
    bda: Union[ModuleSpec, type] = IdentityOp


class KLALayer(MegatronModule):
    def __init__(self, config: TransformerConfig, submodules: KLALayerSubmodules, layer_number: int = 1,
                 pg_collection=None):
        super().__init__(config)
        self.layer_number = layer_number  # global, 1-based
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.tp_group = pg_collection.tp
        self.norm = build_module(submodules.norm, config, config.hidden_size, eps=config.layernorm_epsilon)
        self.mixer = build_module(submodules.mixer, config, layer_number=layer_number, pg_collection=pg_collection)
        self.bda = build_module(submodules.bda)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask=None,
        rotary_pos_emb=None,
        packed_seq_params=None,
        inference_state: Optional[KLAInferenceState] = None,
        **unused,
    ):
        residual = hidden_states
        layer_state = inference_state.for_layer(self.layer_number, self.mixer) if inference_state else None
        out_with_bias = self.mixer(
            self.norm(hidden_states), packed_seq_params=packed_seq_params, inference_state=layer_state
        )
        with torch.enable_grad():
            hidden_states = self.bda(training=self.training, fused=self.config.bias_dropout_fusion)(
                out_with_bias, residual, self.config.hidden_dropout
            )
        return hidden_states, None
