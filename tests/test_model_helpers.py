"""Helpers (no tests) shared by the model's multi-rank tests (CPU/gloo here, NCCL in the gpu tests).

- ``setup_parallel``: megatron parallel state (+ the CPU shim without CUDA).
- ``det_init``: every parameter drawn from a hash of its *global* name at full size, then
  this rank's TP slice taken (honouring ``partition_stride``), so models of any TP/PP
  layout hold the same weights.
- ``run_schedule``: loss (and gradients) through megatron's forward-backward schedule.
- ``local_grads`` / ``assemble``: gradients under global names, reassembled to full tensors.
"""
from __future__ import annotations

import hashlib
import re

import torch

V, SEQ, MICRO_BATCHES = 64, 8, 2


def mixer_variance(model, tp, sp):
    """(out, out_var) of the first KLA mixer on a fixed input, gathered to the full sequence."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    x = torch.randn(SEQ, 2, model.config.hidden_size, generator=torch.Generator().manual_seed(9),
                    dtype=model.config.params_dtype)
    if sp:
        rank = parallel_state.get_tensor_model_parallel_rank()
        x = x.chunk(tp, dim=0)[rank].contiguous()
    mixer = next(layer.mixer for layer in model.decoder.layers if hasattr(layer, "mixer"))
    with torch.no_grad():
        (out, _), out_var = mixer(x, return_variance=True)
    if sp:
        out, out_var = gather_from_sequence_parallel_region(out), gather_from_sequence_parallel_region(out_var)
    return out, out_var


def tiny_config(pattern="K-K-", preset="plain", **overrides):
    """A small model config; ``overrides`` are model config keys as the YAML files write them."""
    from kla_megatron.models import KLAModelConfig

    kw = dict(vocab_size=V, hidden_size=16, num_layers=len(pattern), layer_pattern=pattern, kla_heads=2, d_state=4,
              num_attention_heads=4, ffn_hidden_size=32, preset=preset, kla_var_rank=4, max_seq_len=SEQ)
    kw.update(overrides)
    return KLAModelConfig.from_dict(kw, "tiny_config")


def runtime(scan_backend="torch", recompute_scan=False):
    """How the tests' models run: the exact chunked torch scan unless a test asks for another."""
    from kla_megatron.models import KLARuntimeConfig

    return KLARuntimeConfig(scan_backend=scan_backend, recompute_scan=recompute_scan)


def setup_parallel(tp=1, pp=1, seed=1, vp=None):
    """(Re-)initialise megatron's parallel state; the remaining ranks are data-parallel."""
    from kla_megatron.api import init_parallel

    init_parallel(tp, pp, vp=vp, seed=seed)


def build(cfg, tp=1, pp=1, sp=False, dtype=torch.float64, runtime_config=None, **overrides):
    from megatron.core import parallel_state

    from kla_megatron.models import build_kla_model

    tc = cfg.to_transformer_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   sequence_parallel=sp, params_dtype=dtype, **overrides)
    return build_kla_model(cfg, tc, pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage(), runtime=runtime_config or runtime())


def build_chunks(cfg, tp, pp, sp, vp, dtype=torch.float64):
    """One model chunk per virtual pipeline stage (interleaved schedule)."""
    from megatron.core import parallel_state

    from kla_megatron.models import build_kla_model

    tc = cfg.to_transformer_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                   virtual_pipeline_model_parallel_size=vp, sequence_parallel=sp,
                                   params_dtype=dtype)
    return [
        build_kla_model(cfg, tc, vp_stage=i, runtime=runtime(),
                        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=i),
                        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=i))
        for i in range(vp)
    ]


def global_name(model, name):
    match = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not match:
        return name
    layer = model.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{match.group(2)}"


def _tp():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()


def _local_slice(full, param, tp, rank):
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    chunk = param.shape[dim] // stride
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[rank::tp], dim=dim)


def det_init(model, salt=""):
    tp, rank = _tp()
    with torch.no_grad():
        for name, param in model.named_parameters():
            gname = global_name(model, name)
            if gname == "output_layer.weight" and model.share_embeddings_and_output_weights:
                gname = "embedding.word_embeddings.weight"  # the last stage's copy of the tied weight
            seed = int(hashlib.md5((salt + gname).encode()).hexdigest()[:8], 16)
            gen = torch.Generator().manual_seed(seed)
            shape = list(param.shape)
            if getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= tp
            full = torch.randn(shape, generator=gen, dtype=torch.float64).to(param.device)
            if "norm" in gname:
                full = 1 + 0.1 * full
            elif gname.endswith((".p", ".lambda_skip")):
                full = 0.05 * full.abs() if gname.endswith(".p") else -1 + 0.1 * full
            elif gname.endswith((".A_log", ".delta_raw")):
                full = 0.5 * full
            else:
                full = 0.2 * full
            if getattr(param, "tensor_model_parallel", False) and tp > 1:
                full = _local_slice(full, param, tp, rank)
            param.copy_(full.to(param.dtype))


def batches(seed=3, packed=False):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, V, (MICRO_BATCHES, SEQ), generator=gen)
    labels = torch.randint(0, V, (MICRO_BATCHES, SEQ), generator=gen)
    return [dict(tokens=tokens[i : i + 1], labels=labels[i : i + 1]) for i in range(MICRO_BATCHES)]


def run_schedule(model, data, forward_only=False, packed_seq_params=None):
    """Mean per-token loss over the micro-batches (on the last stage; None elsewhere).
    ``model`` is a model or a list of virtual-pipeline chunks."""
    chunks = model if isinstance(model, list) else [model]
    model = chunks[0]
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def loss_func(output):
        loss = output.float().mean() if output.dtype != torch.float64 else output.mean()
        return loss, {"loss": loss.detach()}

    device = next(model.parameters()).device

    def forward_step(iterator, model):
        batch = next(iterator)
        tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
        out = model(tokens, None, None, labels=labels, packed_seq_params=packed_seq_params)
        return out, loss_func

    for chunk in chunks:
        chunk.zero_grad(set_to_none=True)
    iterators = [iter(data) for _ in chunks]  # every chunk steps through the micro-batches
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks, num_microbatches=len(data),
        seq_length=SEQ, micro_batch_size=1, forward_only=forward_only,
    )
    if not losses:
        return None
    return torch.stack([l["loss"] for l in losses]).mean().item()


def finish_grads(model):
    """What finalize_model_grads does for a DDP-wrapped model: sum SP-replicated grads over
    TP, and the tied embedding / output weight grads over the first and last stages."""
    from megatron.core import parallel_state

    if model.config.sequence_parallel:
        for param in model.parameters():
            if getattr(param, "sequence_parallel", False) and param.grad is not None:
                torch.distributed.all_reduce(param.grad, group=parallel_state.get_tensor_model_parallel_group())
    if model.share_embeddings_and_output_weights and parallel_state.get_pipeline_model_parallel_world_size() > 1:
        if model.pre_process or model.post_process:
            weight = model.shared_embedding_or_output_weight()
            torch.distributed.all_reduce(weight.grad, group=parallel_state.get_embedding_group())


def local_grads(model):
    """{global name: (grad, partition_dim or None, stride)} plus the rank's TP index."""
    tp, rank = _tp()
    grads = {}
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
            continue  # the last stage's copy of the tied weight: compared through the embedding
        sharded = getattr(param, "tensor_model_parallel", False) and tp > 1
        grads[global_name(model, name)] = (
            param.grad.detach().cpu().clone(),
            param.partition_dim if sharded else None,
            getattr(param, "partition_stride", 1),
        )
    from megatron.core import parallel_state

    return {"tp": tp, "tp_rank": rank, "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "dp_rank": parallel_state.get_data_parallel_rank(), "grads": grads}


def assemble(results):
    """Full gradients from every rank's ``local_grads`` (data-parallel replica 0, all
    pipeline stages); TP-replicated copies must agree."""
    by_name = {}
    for res in results:
        if res["dp_rank"] != 0:
            continue
        for name, (grad, dim, stride) in res["grads"].items():
            by_name.setdefault(name, {})[res["tp_rank"]] = (grad, dim, stride)
    full = {}
    for name, shards in by_name.items():
        grad0, dim, stride = shards[0]
        if dim is None:
            for grad, _, _ in shards.values():
                torch.testing.assert_close(grad, grad0, rtol=1e-12, atol=1e-14, msg=f"TP replicas differ: {name}")
            full[name] = grad0
            continue
        tp = len(shards)
        per_rank = [torch.split(shards[r][0], shards[r][0].shape[dim] // stride, dim=dim) for r in range(tp)]
        ordered = [per_rank[r][s] for s in range(stride) for r in range(tp)]
        full[name] = torch.cat(ordered, dim=dim)
    return full


def build_kla_model_from_tc(cfg, tc):
    from megatron.core import parallel_state

    from kla_megatron.models import build_kla_model

    return build_kla_model(cfg, tc, pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage(), runtime=runtime())
