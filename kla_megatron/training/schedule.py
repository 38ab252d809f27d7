"""Learning-rate schedules: linear warmup, then cosine, WSD (warmup-stable-decay), linear or constant.

The schedule is a pure function of the step, so the only scheduler state a checkpoint needs is
the step itself; both engines (megatron and DeepSpeed) apply it the same way.
"""
from __future__ import annotations

import math

from .config import TrainConfig


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the lr used by the step-th update)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "wsd":
        decay = wsd_decay_steps(cfg)
        decay_start = cfg.steps - decay
        if step < decay_start:
            return cfg.lr
        frac = min(1.0, (step - decay_start + 1) / max(1, decay))
        shape = {"linear": 1.0 - frac,
                 "cosine": 0.5 * (1.0 + math.cos(math.pi * frac)),
                 "1-sqrt": 1.0 - math.sqrt(frac)}[cfg.wsd_decay_style]
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape
    total = max(1, cfg.steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / total)
    if cfg.lr_schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * frac))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * (1.0 - frac)  # linear


def wsd_decay_steps(cfg: TrainConfig) -> int:
    """Length of the WSD decay phase: decay_steps, else decay_fraction (default 0.2) of the steps."""
    if cfg.decay_steps is not None:
        return cfg.decay_steps
    fraction = cfg.decay_fraction if cfg.decay_fraction is not None else 0.2
    return max(1, round(fraction * cfg.steps))


def apply_lr(param_groups, cfg: TrainConfig, step: int) -> float:
    """Set every group's lr (times its ``lr_mult``) and weight decay (times its ``wd_mult``)."""
    lr = lr_at(cfg, step)
    for group in param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = cfg.weight_decay * group.get("wd_mult", 1.0)
    return lr
