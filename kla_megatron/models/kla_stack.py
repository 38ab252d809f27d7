"""The hybrid layer stack: one layer per pattern symbol, this pipeline stage's slice.

Layers are numbered globally (1-based) so checkpoints are keyed by global layer index
(``layers.<global>.``) and reshard across pipeline sizes. Stage boundaries follow
megatron's own ``get_num_layers_to_build`` / ``get_transformer_layer_offset`` (even split,
or the uneven first/last-stage settings of TransformerConfig).
"""
from __future__ import annotations

from typing import Dict

import torch
from megatron.core import tensor_parallel
from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, get_transformer_layer_offset
from megatron.core.transformer.utils import sharded_state_dict_default

from kla_megatron.layers import KLALayer, KLANorm
from kla_megatron.parallel.cp_attention import attention_packing


def stage_layers(config, pattern: str, vp_stage=None, pp_rank=None):
    """(offset, symbols) of the layers this pipeline stage builds."""
    if config.pipeline_model_parallel_size > 1:
        unsupported = [name for name in ("pipeline_model_parallel_layout", "account_for_embedding_in_pipeline_split",
                                         "account_for_loss_in_pipeline_split") if getattr(config, name, None)]
        if unsupported:
            raise ValueError(
                f"KLA stack: {unsupported} are not supported; split layers evenly or with "
                "num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage"
            )
        if pp_rank is None:
            from megatron.core import parallel_state

            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        offset = get_transformer_layer_offset(config, vp_stage, pp_rank)
        count = get_num_layers_to_build(config, vp_stage, pp_rank)
    else:
        offset, count = 0, len(pattern)
    return offset, pattern[offset : offset + count]


class KLAStack(MegatronModule):
    """Layers of one pipeline stage (+ the final norm on the last stage). [s, b, h] in/out."""

    def __init__(self, config, pattern: str, specs: Dict[str, ModuleSpec], *, pre_process=True,
                 post_process=True, pg_collection=None, vp_stage=None):
        super().__init__(config)
        if len(pattern) != config.num_layers:
            raise ValueError(
                f"layer pattern has {len(pattern)} symbols but TransformerConfig.num_layers="
                f"{config.num_layers}; make them equal"
            )
        self.pre_process, self.post_process = pre_process, post_process
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.input_tensor = None
        pp_rank = pg_collection.pp.rank() if pg_collection.pp is not None else 0
        offset, symbols = stage_layers(config, pattern, vp_stage, pp_rank)
        self.layer_symbols = symbols
        layers = []
        for i, symbol in enumerate(symbols):
            spec = specs[symbol]
            if issubclass(spec.module, TransformerLayer):
                # TransformerLayer adds the pipeline offset to layer_number itself.
                layers.append(build_module(spec, config=config, layer_number=i + 1, pg_collection=pg_collection,
                                           vp_stage=vp_stage))
            else:
                layers.append(build_module(spec, config=config, layer_number=offset + i + 1,
                                           pg_collection=pg_collection))
        self.layers = torch.nn.ModuleList(layers)
        if post_process:
            self.final_norm = KLANorm(config, config.hidden_size, eps=config.layernorm_epsilon)

    def set_input_tensor(self, input_tensor):
        self.input_tensor = input_tensor

    def _run_layer(self, layer, hidden_states, attention_mask, rotary_pos_emb, packed_seq_params, inference_state):
        kwargs = dict(attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb)
        if isinstance(layer, KLALayer):
            kwargs.update(packed_seq_params=packed_seq_params, inference_state=inference_state)
        elif packed_seq_params is not None:
            kwargs.update(packed_seq_params=attention_packing(packed_seq_params))
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            def run(h, mask):
                return layer(h, **dict(kwargs, attention_mask=mask))[0]

            return tensor_parallel.checkpoint(run, False, hidden_states, attention_mask)
        return layer(hidden_states, **kwargs)[0]

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, packed_seq_params=None,
                inference_state=None):
        if not self.pre_process:
            hidden_states = self.input_tensor
        for layer in self.layers:
            hidden_states = self._run_layer(layer, hidden_states, attention_mask, rotary_pos_emb,
                                            packed_seq_params, inference_state)
        if self.post_process:
            hidden_states = self.final_norm(hidden_states)
        return hidden_states

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        sharded = {}
        for local_index, layer in enumerate(self.layers):
            local_prefix = f"{prefix}layers.{local_index}."
            layer_sd = layer.sharded_state_dict(local_prefix, [], metadata)
            replace_prefix_for_sharding(layer_sd, local_prefix, f"{prefix}layers.{layer.layer_number - 1}.")
            sharded.update(layer_sd)
        for name, module in self.named_children():
            if module is not self.layers:
                sharded.update(sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata,
                                                          tp_group=self.tp_group))
        return sharded
