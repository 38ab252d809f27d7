"""Ornstein–Uhlenbeck discretisation of the KLA dynamics (docs/kla.md#discretisation).

Follows the reference package: process noise enters as ``p`` (the paper writes p²).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DELTA_EPS = 1e-7


def discretize(A_log: torch.Tensor, delta_raw: torch.Tensor, p: torch.Tensor):
    """``(A_log, Δ_raw, p) → (ā, p̄)``, all of one shape (``[H, P, S]`` in layers).

    a_cont = −exp(A_log), Δ = softplus(Δ_raw) + 1e-7, ā = exp(Δ·a_cont),
    p̄ = p / (2|a_cont|) · (1 − exp(−2|a_cont|Δ)).
    """
    rate = torch.exp(A_log)  # |a_cont|
    delta = F.softplus(delta_raw) + DELTA_EPS
    a_bar = torch.exp(-delta * rate)
    # -expm1(-x) = 1 - exp(-x) without cancellation for small rate·Δ.
    p_bar = p / (2 * rate) * (-torch.expm1(-2 * rate * delta))
    return a_bar, p_bar
