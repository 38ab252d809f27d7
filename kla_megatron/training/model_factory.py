"""Build the KLA model chunks of this rank from the model config and the run's layout."""
from __future__ import annotations

import torch

from .config import RunConfig


def models_api():
    """The model package: build_kla_model, flops_per_token."""
    from kla_megatron import models

    return models


def enable_cpu_megatron() -> None:
    from kla_megatron.compat.cpu import enable_cpu_megatron as enable

    enable()


def model_config(run: RunConfig):
    """The model this job builds: the run's architecture with the vocabulary padded for its TP size
    (``KLAModelConfig.padded_vocab_size``). A ``train.seq_length`` above the model's ``max_seq_len``
    is rejected (ValueError)."""
    if run.train.seq_length > run.model.max_seq_len:
        raise ValueError(f"train.seq_length {run.train.seq_length} is longer than the model's max_seq_len "
                         f"{run.model.max_seq_len} ({run.model.name}); use a model config with max_seq_len >= "
                         f"{run.train.seq_length}")
    return run.model.with_padded_vocab(run.parallel.tensor)


def transformer_config(run: RunConfig, model_cfg):
    p, t = run.parallel, run.train
    bf16 = t.precision == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    kw = dict(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
              virtual_pipeline_model_parallel_size=p.virtual_pipeline, context_parallel_size=p.context,
              sequence_parallel=p.sequence_parallel, bf16=bf16, params_dtype=dtype, pipeline_dtype=dtype,
              deterministic_mode=t.deterministic)
    if p.virtual_pipeline:
        # Megatron-LM's interleaved-schedule p2p: forward and backward exchanges in separate calls.
        # megatron-core's default batches them, and at PP=2 (previous stage = next stage) a rank's
        # send-to-next and send-to-previous then reach the other rank in the wrong order:
        # activations arrive as gradients and the reverse, from the second micro-batch on.
        kw.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if t.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif t.recompute == "selective":
        kw.update(recompute_granularity="selective")
    return model_cfg.to_transformer_config(**kw)


def build_model_chunks(run: RunConfig, model_cfg, tc) -> list[torch.nn.Module]:
    """One chunk per virtual pipeline stage (one without interleaving), each on its own stage."""
    from megatron.core import parallel_state as ps

    api = models_api()
    n_chunks = run.parallel.virtual_pipeline or 1
    chunks = []
    for vp in range(n_chunks):
        vp_stage = vp if run.parallel.virtual_pipeline else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
        chunk = api.build_kla_model(model_cfg, tc, pre_process=pre, post_process=post, vp_stage=vp_stage,
                                    runtime=run.runtime())
        if torch.cuda.is_available():
            chunk.cuda(torch.cuda.current_device())
        chunks.append(chunk)
    return chunks
