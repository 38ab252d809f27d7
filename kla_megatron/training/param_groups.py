"""Parameter groups as in the KLA paper.

The model marks its parameters (see ``kla_megatron/layers/kla_mixer.py``):
``param.lr_mult`` (the SSM parameters A_log, Δ, p get the model config's ``ssm_lr_mult``, 0.1 by
default; they set the recurrence's time scales and drift under the full lr) and
``param.no_weight_decay``. On top of that, norm weights, biases and embeddings get no weight
decay. Each group carries ``lr_mult``/``wd_mult``, which
:func:`kla_megatron.training.schedule.apply_lr` reads every step.

A :class:`GroupPolicy` (from the run's ``train`` section) refines this for recipes such as the
paper's: a separate input-embedding learning rate, further members of the SSM group (e.g.
λ_skip) and no weight decay on the conv kernels. Without one, the rules above apply unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GroupPolicy:
    """Run-level refinements of the model's parameter marks."""

    embedding_lr_mult: float = 1.0
    """Input-embedding lr / lr (``train.embedding_lr / train.lr``)."""
    ssm_extra: tuple[str, ...] = ()
    """Last name parts that join the SSM group (``train.ssm_group_extra``)."""
    ssm_lr_mult: float = 0.1
    """The SSM group's lr multiplier (the model config's ``ssm_lr_mult``)."""
    decay_conv: bool = True
    """Weight decay on the KLA conv kernels (``train.decay_conv``)."""

    @classmethod
    def from_config(cls, train, model_cfg) -> "GroupPolicy":
        emb = 1.0 if train.embedding_lr is None else train.embedding_lr / train.lr
        return cls(embedding_lr_mult=emb, ssm_extra=tuple(train.ssm_group_extra),
                   ssm_lr_mult=float(model_cfg.mixer.ssm_lr_mult), decay_conv=train.decay_conv)


def is_input_embedding(name: str) -> bool:
    return "word_embeddings" in name


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    if getattr(param, "no_weight_decay", False):
        return True
    if param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower():
        return True
    # Input embeddings (and an output layer tied to them) are lookup tables, not projections.
    return "embedding" in name


def group_multipliers(name: str, param: torch.nn.Parameter, policy: GroupPolicy | None = None) -> tuple[float, float]:
    """(lr_mult, wd_mult) of one parameter."""
    lr_mult, no_decay = float(getattr(param, "lr_mult", 1.0)), is_no_decay(name, param)
    if policy is not None:
        leaf = name.rsplit(".", 1)[-1]
        if leaf in policy.ssm_extra:
            lr_mult, no_decay = policy.ssm_lr_mult, True
        elif is_input_embedding(name):
            lr_mult *= policy.embedding_lr_mult
        if leaf == "conv_weight" and not policy.decay_conv:
            no_decay = True
    return lr_mult, 0.0 if no_decay else 1.0


def _group_key(name: str, param: torch.nn.Parameter, policy: GroupPolicy | None = None) -> tuple[float, float, str]:
    return (*group_multipliers(name, param, policy), str(param.dtype).removeprefix("torch."))


def megatron_config_overrides(model_chunks, policy: GroupPolicy | None = None) -> dict:
    """ParamKey -> override map for ``get_megatron_optimizer``: one group per distinct
    (lr_mult, wd_mult, dtype).

    The dtype is part of the key because the model keeps its SSM parameters fp32 in a bf16
    model, and megatron-core 0.16's DistributedOptimizer mis-indexes a group that mixes fp32 and
    bf16 parameters when it builds the checkpoint state (it lists a group's bf16 shards before
    its fp32 ones but looks them up in the original order).
    """
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    keys = sorted({_group_key(n, p, policy) for chunk in model_chunks for n, p in chunk.named_parameters()})
    overrides = {}
    for key in keys:
        lr_mult, wd_mult, dtype = key
        pred = ParamWithNamePredicate(name=f"lr{lr_mult}_wd{wd_mult}_{dtype}",
                                      fn=lambda p, n, key=key: _group_key(n, p, policy) == key)
        overrides[ParamKey(with_name_predicate=pred)] = {"lr_mult": lr_mult, "wd_mult": wd_mult, "dtype": dtype}
    return overrides


def torch_param_groups(model: torch.nn.Module, policy: GroupPolicy | None = None) -> list[dict]:
    """Plain torch param groups (DeepSpeed engine), in a deterministic order."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(group_multipliers(name, param, policy), []).append(param)
    return [{"params": ps, "lr_mult": lm, "wd_mult": wm} for (lm, wm), ps in sorted(groups.items())]
