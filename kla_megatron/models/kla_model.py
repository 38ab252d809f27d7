"""``KLAModel``: embedding → hybrid KLA stack → final norm → output layer, as a megatron-core
language model (GPTModel semantics: ``[b, s]`` ids in; per-token fp32 loss ``[b, s]`` with
labels, else logits ``[b, s, vocab]`` gathered over TP).

Pipeline stages: ``pre_process`` owns the embedding, ``post_process`` the final norm and the
output layer; the pattern is split across stages by the stack. Packed sequences:
``packed_seq_params.cu_seqlens_q`` (micro-batch 1) restart every KLA layer's conv and filter
per document; `*` layers get the same offsets (``attention_packing``: flash varlen on GPU, no
s×s mask). Recompute: ``TransformerConfig.recompute_granularity="full"`` recomputes whole
layers; ``KLARuntimeConfig.recompute_scan`` only the KLA scans.
"""
from __future__ import annotations

from typing import Optional

import torch
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import LanguageModelEmbedding
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import ModelType

from kla_megatron.layers import KLAInferenceState, KLARuntimeConfig
from kla_megatron.parallel.cp_attention import cp_rotary_embedding

from .config import KLAModelConfig
from .kla_layer_specs import layer_specs
from .kla_stack import KLAStack


class KLAModel(LanguageModule):
    def __init__(self, cfg: KLAModelConfig, config, *, pre_process: bool = True, post_process: bool = True,
                 vp_stage: Optional[int] = None, pg_collection: Optional[ProcessGroupCollection] = None,
                 runtime: Optional[KLARuntimeConfig] = None):
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        super().__init__(config=config, pg_collection=pg_collection)
        if config.num_layers != cfg.num_layers or config.hidden_size != cfg.hidden_size:
            raise ValueError(
                f"TransformerConfig (num_layers={config.num_layers}, hidden_size={config.hidden_size}) does not "
                f"match KLAModelConfig ({cfg.num_layers}, {cfg.hidden_size}); build it with cfg.to_transformer_config()"
            )
        cfg.mixer.validate(cfg.hidden_size, self.pg_collection.tp.size())
        self.cfg = cfg
        self.runtime = runtime or KLARuntimeConfig()
        self.pre_process, self.post_process = pre_process, post_process
        self.vp_stage = vp_stage
        self.share_embeddings_and_output_weights = cfg.tie_embeddings
        self.model_type = ModelType.encoder_or_decoder
        self.vocab_size = cfg.vocab_size
        self.max_sequence_length = cfg.max_seq_len
        self.position_embedding_type = cfg.position_embedding
        self.has_attention = "*" in cfg.layer_pattern

        if pre_process:
            self.embedding = LanguageModelEmbedding(
                config=config, vocab_size=cfg.vocab_size, max_sequence_length=cfg.max_seq_len,
                position_embedding_type="none", tp_group=self.pg_collection.tp,
            )
        if cfg.position_embedding == "rope":
            self.rotary_pos_emb = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=1.0, rotary_base=cfg.rotary_base,
                use_cpu_initialization=config.use_cpu_initialization, cp_group=self.pg_collection.cp,
            )
        self.decoder = KLAStack(config, cfg.layer_pattern, layer_specs(cfg, self.runtime), pre_process=pre_process,
                                post_process=post_process, pg_collection=self.pg_collection, vp_stage=vp_stage)
        if post_process:
            self.output_layer = tensor_parallel.ColumnParallelLinear(
                config.hidden_size, cfg.vocab_size, config=config, init_method=config.init_method, bias=False,
                skip_bias_add=False, gather_output=False,
                skip_weight_param_allocation=pre_process and cfg.tie_embeddings, tp_group=self.pg_collection.tp,
            )
        if pre_process or post_process:
            self.setup_embeddings_and_output_layer()

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, list):
            if len(input_tensor) != 1:
                raise ValueError(f"KLAModel.set_input_tensor expects one tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    def new_inference_state(self, batch_size: int) -> KLAInferenceState:
        """Empty decoding state for ``forward(..., inference_state=...)`` (pure KLA/MLP patterns)."""
        if self.has_attention:
            raise ValueError("KLAModel: recurrent decoding needs a pattern without '*' layers (no KV cache here)")
        return KLAInferenceState(batch_size)

    def _sequence_length(self, input_ids, decoder_input) -> int:
        """Full sequence length (hidden states are [s/TP, b, h] under sequence parallelism)."""
        if input_ids is not None:
            return input_ids.shape[1]
        hidden = decoder_input if decoder_input is not None else self.decoder.input_tensor
        return hidden.shape[0] * (self.pg_collection.tp.size() if self.config.sequence_parallel else 1)

    def forward(self, input_ids, position_ids=None, attention_mask=None, labels=None, packed_seq_params=None,
                inference_state: Optional[KLAInferenceState] = None, decoder_input=None):
        if inference_state is not None and self.has_attention:
            raise ValueError("KLAModel: inference_state is only supported for patterns without '*' layers")
        if decoder_input is None and self.pre_process:
            decoder_input = self.embedding(input_ids=input_ids, position_ids=None)
        rotary_pos_emb = None
        if self.position_embedding_type == "rope":
            rotary_pos_emb = cp_rotary_embedding(self.rotary_pos_emb, self._sequence_length(input_ids, decoder_input),
                                                 self.pg_collection.cp)
        hidden_states = self.decoder(decoder_input, attention_mask=attention_mask, rotary_pos_emb=rotary_pos_emb,
                                     packed_seq_params=packed_seq_params, inference_state=inference_state)
        if not self.post_process:
            return hidden_states
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is None:
            logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=True)
            return logits.transpose(0, 1).contiguous()
        logits, _ = self.output_layer(hidden_states, weight=weight)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()  # the loss is fp32 (fp64 stays fp64)
        return self.compute_language_model_loss(labels, logits)


def build_kla_model(cfg: KLAModelConfig, transformer_config, *, pre_process: bool = True,
                    post_process: bool = True, vp_stage: Optional[int] = None,
                    runtime: Optional[KLARuntimeConfig] = None) -> KLAModel:
    """Build this rank's part of the model (megatron parallel state must be initialised);
    ``runtime``: how its KLA layers run (default ``KLARuntimeConfig()``)."""
    return KLAModel(cfg, transformer_config, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage,
                    runtime=runtime)
