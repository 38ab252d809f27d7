"""DeepSpeed engine (``engine: deepspeed``): the same KLA model, data and schedule, trained with
ZeRO stage 0-3 (optionally CPU offload) over data parallelism only.

What it does not do, with the error the config raises: tensor/pipeline/context parallelism
(use ``engine: megatron``), ``nan_policy: skip`` (DeepSpeed applies the update inside
``engine.step()``; we abort instead, before anything is saved), and resuming under a different
data-parallel size (DeepSpeed's ZeRO checkpoints are partitioned per rank).
On a machine without CUDA, ``DS_ACCELERATOR=cpu`` is set before DeepSpeed is imported.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from . import data as data_mod
from .config import RunConfig
from .megatron_engine import StepResult, device
from .model_factory import build_model_chunks, transformer_config
from .param_groups import GroupPolicy, torch_param_groups
from .schedule import apply_lr

TAG = "ds"


def import_deepspeed():
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise ValueError("engine 'deepspeed' needs DeepSpeed: pip install 'kla-megatron[deepspeed]'") from exc
    return deepspeed


# DeepSpeed's default ZeRO reduce bucket (elements): allocated anew at every micro-step.
REDUCE_BUCKET = 500_000_000


def deepspeed_config(run: RunConfig, dp: int, n_params: int | None = None) -> dict:
    """The DeepSpeed config of ``run`` at data-parallel size ``dp``; ``n_params`` (the model's
    parameter count) caps the reduce bucket: a bucket larger than every gradient together changes
    nothing but its allocation, 2 GB per micro-step by default (minutes of page faults on CPU)."""
    t, d = run.train, run.deepspeed
    zero = {"stage": d.zero_stage}
    if n_params is not None:
        zero["reduce_bucket_size"] = min(REDUCE_BUCKET, -(-n_params // 1_000_000) * 1_000_000)
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if d.offload_param:
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * dp),
        "gradient_clipping": t.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        # We pass a torch AdamW with our param groups; allow it under offload too (no CPU-Adam build).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


@contextlib.contextmanager
def _scalar_safe_broadcast():
    """DeepSpeed 0.19 broadcasts parameters as ``p.data.view(torch.uint8)``, which fails for 0-dim
    parameters (the KLA mixer's λ_skip). Give them a 1-element shape while the engine is built."""
    from deepspeed.runtime.engine import DeepSpeedEngine as Engine

    original = Engine._broadcast_model

    def broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            original(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    Engine._broadcast_model = broadcast_model
    try:
        yield
    finally:
        Engine._broadcast_model = original


@contextlib.contextmanager
def _without_shm_comm_build():
    """On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op (a C++ build of
    one to three minutes, needing a compiler) that only its inference all-reduce uses; training
    reduces through torch.distributed (gloo). Skip the build while the backend is created."""
    import importlib

    ds_torch = importlib.import_module("deepspeed.comm.torch")  # the attribute 'torch' is the torch module
    original = ds_torch.build_shm_op
    ds_torch.build_shm_op = lambda: None
    try:
        yield
    finally:
        ds_torch.build_shm_op = original


class DeepSpeedEngine:
    def __init__(self, run: RunConfig, model_cfg, eod_id: int):
        deepspeed = import_deepspeed()
        self.run, self.eod_id = run, eod_id
        t = run.train
        dp = dist.get_world_size()
        self.tc = transformer_config(run, model_cfg)
        (model,) = build_model_chunks(run, model_cfg, self.tc)
        if t.precision == "bf16":
            model = model.to(torch.bfloat16)
        with contextlib.nullcontext() if torch.cuda.is_available() else _without_shm_comm_build():
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        groups = torch_param_groups(model, GroupPolicy.from_config(t, model_cfg))
        optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        config = deepspeed_config(run, dp, n_params=sum(p.numel() for p in model.parameters()))
        with _scalar_safe_broadcast():
            self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        self.packed = data_mod.packs_documents(run)

    def _loss_sums(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, kwargs = data_mod.model_inputs(batch, self.eod_id, self.packed, device())
        losses = self.engine(inputs["tokens"], inputs["position_ids"], None, labels=inputs["labels"], **kwargs)
        mask = inputs["loss_mask"]
        return (losses.float() * mask).sum(), mask.sum()

    def _global(self, loss_sum: float, n: float) -> float:
        t = torch.tensor([loss_sum, n], dtype=torch.float64, device=device())
        dist.all_reduce(t)
        return float(t[0] / t[1].clamp(min=1))

    def train_step(self, micro_batches: list[dict], step: int) -> StepResult:
        self.engine.train()
        lr = apply_lr(self.optimizer.param_groups, self.run.train, step)
        total, count = 0.0, 0.0
        for batch in micro_batches:
            loss_sum, n = self._loss_sums(batch)
            # The engine divides by the accumulation steps; we give it the micro-batch token mean.
            self.engine.backward(loss_sum / n.clamp(min=1))
            self.engine.step()
            total, count = total + float(loss_sum.detach()), count + float(n)
        loss = self._global(total, count)
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        skipped = not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(grad_norm)))
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, skipped=skipped)

    @torch.no_grad()
    def eval_loss(self, batches: list[list[dict]]) -> float:
        self.engine.eval()
        total, count = 0.0, 0.0
        for micro_batches in batches:
            for batch in micro_batches:
                loss_sum, n = self._loss_sums(batch)
                total, count = total + float(loss_sum), count + float(n)
        self.engine.train()
        return self._global(total, count)

    def save(self, path: str, common: dict) -> None:
        self.engine.save_checkpoint(path, tag=TAG, client_state={"common": common})

    def load(self, path: str) -> dict:
        _, client = self.engine.load_checkpoint(path, tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if client is None:
            raise ValueError(f"checkpoint {path}: DeepSpeed found no checkpoint to load")
        return client["common"]
