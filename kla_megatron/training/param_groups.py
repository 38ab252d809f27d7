"""Parameter groups as in the KLA paper.

- SSM parameters (the model tags them ``param.is_ssm_param = True``: A_log, Δ, p): lr × ``ssm_lr_mult``
  (0.1 by default) and no weight decay; they set the recurrence's time scales and drift under
  the full lr and decay.
- Norm weights, biases and embeddings: no weight decay.
- Everything else: full lr and weight decay.
"""
from __future__ import annotations

import torch

SSM_ATTR = "is_ssm_param"
SSM_NAME_HINTS = ("A_log", "a_log", "dt_bias", "delta", "p_log")


def is_ssm_param(name: str, param: torch.nn.Parameter) -> bool:
    if hasattr(param, SSM_ATTR):
        return bool(getattr(param, SSM_ATTR))
    return False


def is_no_decay(name: str, param: torch.nn.Parameter) -> bool:
    if param.ndim <= 1 or name.endswith(".bias") or "norm" in name.lower():
        return True
    # Input embeddings (and an output layer tied to them) are lookup tables, not projections.
    return "embedding" in name


def group_multipliers(name: str, param: torch.nn.Parameter, ssm_lr_mult: float) -> tuple[float, float]:
    """(lr_mult, wd_mult) of one parameter."""
    if is_ssm_param(name, param):
        return ssm_lr_mult, 0.0
    return 1.0, 0.0 if is_no_decay(name, param) else 1.0


def megatron_config_overrides(ssm_lr_mult: float) -> dict:
    """ParamKey -> override map for ``get_megatron_optimizer``; groups carry lr_mult/wd_mult
    which :func:`kla_megatron.training.schedule.apply_lr` reads."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    ssm = ParamWithNamePredicate(name="ssm", fn=lambda p, n: is_ssm_param(n, p))
    no_decay = ParamWithNamePredicate(name="no_decay",
                                      fn=lambda p, n: not is_ssm_param(n, p) and is_no_decay(n, p))
    return {
        ParamKey(with_name_predicate=ssm): {"lr_mult": ssm_lr_mult, "wd_mult": 0.0},
        ParamKey(with_name_predicate=no_decay): {"wd_mult": 0.0},
    }


def torch_param_groups(model: torch.nn.Module, ssm_lr_mult: float) -> list[dict]:
    """Plain torch param groups (DeepSpeed engine), in a deterministic order."""
    groups: dict[tuple[float, float], list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(group_multipliers(name, param, ssm_lr_mult), []).append(param)
    return [{"params": ps, "lr_mult": lm, "wd_mult": wm} for (lm, wm), ps in sorted(groups.items())]
