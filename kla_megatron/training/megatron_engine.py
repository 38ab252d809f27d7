"""Megatron-core engine: DDP + (distributed) optimizer, pipeline schedules, dist checkpoints.

One optimizer step is ``train_step(micro_batches, step)``: zero the grad buffers, set the lr,
run megatron's forward-backward schedule over the micro-batches (1F1B, interleaved or none,
chosen by ``get_forward_backward_func`` from the layout), check that every gradient is finite,
then step the optimizer (which clips the global grad norm). Under context parallelism every
rank of a CP group gets the same micro-batches and gives the model its shard of each sequence.
"""
from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kla_megatron.parallel import MODEL_CP_LAYOUT, get_cp_shard

from . import data as data_mod
from .config import RunConfig
from .model_factory import build_model_chunks, transformer_config
from .param_groups import GroupPolicy, megatron_config_overrides
from .schedule import apply_lr

DIST_OPT_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class StepResult:
    loss: float
    """Token-mean loss over the global batch (NaN if non-finite)."""
    grad_norm: float
    lr: float
    skipped: bool


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class MegatronEngine:
    def __init__(self, run: RunConfig, model_cfg, eod_id: int):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.distributed.finalize_model_grads import finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.transformer.module import Float16Module

        self.run, self.eod_id = run, eod_id
        self.packed = data_mod.packs_documents(run)
        t = run.train
        self.tc = transformer_config(run, model_cfg)
        chunks = build_model_chunks(run, model_cfg, self.tc)
        self.raw_chunks = chunks
        if t.precision == "bf16":
            chunks = [Float16Module(self.tc, c) for c in chunks]
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=run.overlap_grad_reduce,
            use_distributed_optimizer=run.use_distributed_optimizer,
            bucket_size=None if not run.overlap_grad_reduce else max(40_000_000, 1_000_000 * ps.get_data_parallel_world_size()))
        # Megatron disables bucketing for all but the first chunk: their grads are ready last.
        self.chunks = [DistributedDataParallel(config=self.tc, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
                       for i, c in enumerate(chunks)]
        for c in self.chunks:
            c.broadcast_params()  # identical start on every data-parallel rank
        self.tc.finalize_model_grads_func = finalize_model_grads
        if run.overlap_grad_reduce:
            no_sync = [c.no_sync for c in self.chunks]
            self.tc.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        ocfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps, clip_grad=t.clip_grad, bf16=t.precision == "bf16",
            params_dtype=self.tc.params_dtype, use_distributed_optimizer=run.use_distributed_optimizer)
        self.optimizer = get_megatron_optimizer(ocfg, self.chunks,
                                                config_overrides=megatron_config_overrides(
                                                    self.chunks, GroupPolicy.from_config(t, model_cfg)))
        self.dp_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.pp_group = ps.get_pipeline_model_parallel_group()
        self.is_last_stage = ps.is_pipeline_last_stage(ignore_virtual=True)
        # Context parallelism: each rank of the CP group feeds the model its shard of every
        # sequence (megatron's load-balanced order, the one the KLA and attention layers expect).
        self.cp_group = ps.get_context_parallel_group()
        self.cp_rank, self.cp_size = ps.get_context_parallel_rank(), ps.get_context_parallel_world_size()

    # ------------------------------------------------------------------ steps

    def _forward_step(self, data_iterator, model):
        # Packing offsets come from the full rows, before CP sharding: global on every CP rank.
        inputs, kwargs = data_mod.model_inputs(next(data_iterator), self.eod_id, self.packed, device())
        local = get_cp_shard(inputs, self.cp_rank, self.cp_size, MODEL_CP_LAYOUT)
        output = model(local["tokens"], local["position_ids"], None, labels=local["labels"], **kwargs)
        return output, functools.partial(self._loss_func, local["loss_mask"])

    def _loss_func(self, loss_mask: torch.Tensor, output_tensor: torch.Tensor):
        """(loss to backprop, token count it is divided by, reported [loss_sum, n_tokens]).

        The schedule divides the first value by the count and by the micro-batch count; DDP then
        sums gradients over the data+context-parallel group and divides by its size. Under CP
        each rank holds a part of the micro-batch's tokens, so the count is the micro-batch's
        total (summed over the CP group) and the loss is scaled by CP to undo DDP's 1/CP: the
        reduced gradient is then that of the micro-batch's token-mean loss, whatever the split
        of masked tokens between ranks. The report stays local; ``_global_loss`` sums it.
        """
        losses = output_tensor.float().reshape(-1)
        mask = loss_mask.reshape(-1)
        loss_sum = (losses * mask).sum()
        n_local = mask.sum()
        report = {"lm loss": torch.stack([loss_sum.detach(), n_local])}
        if self.cp_size == 1:
            return loss_sum, n_local.to(torch.int), report
        n_tokens = n_local.detach().clone()
        dist.all_reduce(n_tokens, group=self.cp_group)
        return loss_sum * self.cp_size, n_tokens.to(torch.int), report

    def _run_schedule(self, micro_batches: list[dict], forward_only: bool) -> torch.Tensor:
        """Forward(-backward) over the micro-batches; returns [loss_sum, n_tokens] summed over
        this rank's micro-batches (zeros off the last pipeline stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        n_chunks = len(self.chunks)
        iterators = [iter(micro_batches) for _ in range(n_chunks)]
        t = self.run.train
        out = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=iterators if n_chunks > 1 else iterators[0],
            model=self.chunks, num_microbatches=len(micro_batches),
            # The global length: megatron divides it by CP for the pipeline's p2p shapes.
            seq_length=t.seq_length * (t.micro_batch_size if self.packed else 1),
            micro_batch_size=1 if self.packed else t.micro_batch_size, forward_only=forward_only)
        total = torch.zeros(2, dtype=torch.float64, device=device())
        for item in out or []:
            total += item["lm loss"].double()
        return total

    def _global_loss(self, local: torch.Tensor) -> float:
        """Token-mean loss over the global batch, the same value on every rank."""
        dist.all_reduce(local, group=self.dp_group)
        dist.all_reduce(local, group=self.pp_group)  # only the last stage holds non-zeros
        return float(local[0] / local[1].clamp(min=1))

    def _grads_finite(self) -> bool:
        ok = torch.ones(1, device=device())
        for chunk in self.chunks:
            for buf in chunk.buffers + chunk.expert_parallel_buffers:
                if not torch.isfinite(buf.grad_data).all():
                    ok.zero_()
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult:
        for chunk in self.chunks:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        lr = apply_lr(self.optimizer.param_groups, self.run.train, step)
        loss = self._global_loss(self._run_schedule(micro_batches, forward_only=False))
        if not (torch.isfinite(torch.tensor(loss)) and self._grads_finite()):
            return StepResult(loss=loss, grad_norm=float("nan"), lr=lr, skipped=True)
        ok, grad_norm, _ = self.optimizer.step()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=not ok)

    @torch.no_grad()
    def eval_loss(self, batches: list[list[dict]]) -> float:
        total = torch.zeros(2, dtype=torch.float64, device=device())
        for chunk in self.chunks:
            chunk.eval()
        for micro_batches in batches:
            total += self._run_schedule(micro_batches, forward_only=True)
        for chunk in self.chunks:
            chunk.train()
        return self._global_loss(total)

    # ------------------------------------------------------------------ checkpoints

    def _model_sharded_state_dict(self) -> dict:
        # Call sharded_state_dict() on the unwrapped modules: DDP/Float16Module add prefixes.
        if len(self.raw_chunks) == 1:
            return {"model": self.raw_chunks[0].sharded_state_dict()}
        return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(self.raw_chunks)}

    def save(self, path: str, common: dict) -> None:
        from megatron.core import dist_checkpointing

        msd = self._model_sharded_state_dict()
        state = dict(msd)
        state["optimizer"] = self.optimizer.sharded_state_dict(msd, is_loading=False,
                                                               metadata=DIST_OPT_SHARDING)
        state["common"] = common  # plain objects: written once, by rank 0, into common.pt
        dist_checkpointing.save(state, path)

    def load(self, path: str) -> dict:
        from megatron.core import dist_checkpointing

        inner = _inner_optimizers(self.optimizer)
        if self.run.use_distributed_optimizer:
            for o in inner:
                # megatron-core 0.16 without apex/TE: DistributedOptimizer.state_dict() asserts on a
                # fresh torch AdamW (no 'step' yet); give it zero states that the load overwrites.
                o._init_optimizer_states_with_dummy_values()
                _fix_set_state(o)
        msd = self._model_sharded_state_dict()
        state = dict(msd)
        state["optimizer"] = self.optimizer.sharded_state_dict(msd, is_loading=True,
                                                               metadata=DIST_OPT_SHARDING)
        state["common"] = None
        common = dist_checkpointing.load_common_state_dict(path)["common"]
        del state["common"]
        loaded = dist_checkpointing.load(state, path)
        # The optimizer finds model params anywhere in the nested dict (by identity).
        for key, chunk in zip(list(msd), self.raw_chunks):
            chunk.load_state_dict(loaded[key], strict=True)
        self.optimizer.load_state_dict(loaded["optimizer"])
        if self.run.use_distributed_optimizer:
            for o in inner:
                _per_param_step(o)
        return common


def _inner_optimizers(opt) -> list:
    return list(getattr(opt, "chained_optimizers", [opt]))


def _fix_set_state(o) -> None:
    """megatron-core 0.16 bug: the fully_reshardable format does not store torch AdamW's per-param
    'step', and DistributedOptimizer._set_main_param_and_optimizer_states then fails with
    KeyError 'step'. Copy only the tensors the checkpoint has (patched on this instance only)."""
    original = o._set_main_param_and_optimizer_states

    @torch.no_grad()
    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        for key, dst in {"param": main_param, **self.optimizer.state[main_param]}.items():
            if key in tensors:
                dst.copy_(tensors[key])

    o._set_main_param_and_optimizer_states = types.MethodType(set_states, o)


def _per_param_step(o) -> None:
    """megatron-core 0.16 bug: after loading, every param may share ONE 'step' tensor (kept in
    param_group['step']), which AdamW then increments once per param, corrupting bias correction.
    Give every param its own step tensor."""
    for group in o.optimizer.param_groups:
        if group.get("step") is None:
            continue
        for p in group["params"]:
            state = o.optimizer.state.get(p)
            if state is not None and "step" in state:
                state["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
