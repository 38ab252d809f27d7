"""The KLA layer's math in plain PyTorch: the one source for the package and for exported models.

What lives here is the definition the fast paths are checked against (docs/kla.md): the
constants, the Ornstein–Uhlenbeck discretisation and the initial values of its parameters, the
sensor activations, the default belief (λ = 1, η = 0), the information-form filter step and
its sequential scan, and the causal depthwise conv.

This file imports only torch. The Hugging Face export copies it next to ``modeling_kla.py``
(``kla_megatron/checkpoint/hf_io.py``), which imports it as ``.kla_core``, so an exported model
runs without our package. Keep it free of package imports.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

OBS_VAR_MIN = 1e-4  # floor on the observation variance (the reference's `obs_var_min`)
L2_EPS = 1e-12  # floor on ‖k‖, ‖q‖ before normalising
DELTA_EPS = 1e-7  # Δ = softplus(Δ_raw) + DELTA_EPS
P_MIN = 1e-7  # the learned process noise is clamped here (reference): keeps p ≥ 0

# Initial values of the dynamics (the reference's defaults, docs/kla.md#discretisation).
DT_MIN, DT_MAX, DT_INIT_FLOOR = 1e-3, 1e-1, 1e-4
P_INIT = 0.01
LAMBDA_SKIP_INIT = -1.0

State = Tuple[torch.Tensor, torch.Tensor]


def state_dtype(t: torch.Tensor) -> torch.dtype:
    """The filter's working precision for tensors like ``t``: fp32, or fp64 for fp64."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------- dynamics


def discretize(A_log: torch.Tensor, delta_raw: torch.Tensor, p: torch.Tensor) -> State:
    """``(A_log, Δ_raw, p) → (ā, p̄)``, all of one shape (``[H, P, S]`` in layers).

    a_cont = −exp(A_log), Δ = softplus(Δ_raw) + 1e-7, ā = exp(Δ·a_cont),
    p̄ = p / (2|a_cont|) · (1 − exp(−2|a_cont|Δ)). As the reference package, p where the
    paper writes p².
    """
    rate = torch.exp(A_log)  # |a_cont|
    delta = F.softplus(delta_raw) + DELTA_EPS
    a_bar = torch.exp(-delta * rate)
    # -expm1(-x) = 1 - exp(-x) without cancellation for small rate·Δ.
    p_bar = p / (2 * rate) * (-torch.expm1(-2 * rate * delta))
    return a_bar, p_bar


def dynamics(A_log: torch.Tensor, delta_raw: torch.Tensor, p: torch.Tensor) -> State:
    """A layer's discrete (ā, p̄) from its learned parameters, in fp32 (fp64 for fp64 ones),
    the process noise clamped at ``P_MIN``."""
    dtype = state_dtype(A_log)
    return discretize(A_log.to(dtype), delta_raw.to(dtype), p.to(dtype).clamp_min(P_MIN))


def initial_delta_raw(shape, dt_min: float = DT_MIN, dt_max: float = DT_MAX,
                      dt_init_floor: float = DT_INIT_FLOOR) -> torch.Tensor:
    """Δ_raw (float64) with Δ log-uniform in [dt_min, dt_max], floored at ``dt_init_floor``,
    stored as softplus⁻¹(Δ)."""
    log_lo, log_hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(shape, dtype=torch.float64) * (log_hi - log_lo) + log_lo).clamp_min(dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


# ---------------------------------------------------------------------- sensors


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(L2_EPS)


def precision_from_log_var(log_var: torch.Tensor) -> torch.Tensor:
    """Λv = 1/(softplus(log σ²_v) + OBS_VAR_MIN)."""
    return 1.0 / (F.softplus(log_var) + OBS_VAR_MIN)


def torch_sensor_activations(v, log_var, k, q, dtype=None):
    """``(v, Λv, k̂, q̂)`` from the raw sensor outputs, any layout, computed in ``dtype``
    (default: the inputs')."""
    dtype = dtype or v.dtype
    return v.to(dtype), precision_from_log_var(log_var.to(dtype)), l2_normalize(k.to(dtype)), l2_normalize(q.to(dtype))


# ---------------------------------------------------------------------- filter


def default_state(shape, dtype=None, device=None) -> State:
    """The belief before the first token: λ = 1, η = 0 (prior mean 0, variance 1), each ``shape``
    (``[N, H, P, S]``)."""
    return torch.ones(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)


def filter_step(v, lambda_v, k, q, a, p, lam, eta):
    """One token of the filter in information form (docs/kla.md#filter), in the state's dtype.

    v, lambda_v ``[B, H, P]``; k, q ``[B, H, S]``; a, p ``[H, P, S]``; lam, eta ``[B, H, P, S]``.
    Returns y, y_var ``[B, H, P]`` and the new (lam, eta)."""
    v, lambda_v, k, q, a, p = (x.to(lam.dtype) for x in (v, lambda_v, k, q, a, p))
    k = k[:, :, None, :]
    d = a * a + p * lam
    lam = lam / d + lambda_v[..., None] * (k * k)
    eta = (a / d) * eta + (v * lambda_v)[..., None] * k
    mu, sigma = eta / lam, 1.0 / lam
    qe = q[:, :, None, :]
    return (qe * mu).sum(-1), (qe * qe * sigma).sum(-1), lam, eta


def filter_scan(v, lambda_v, k, q, a, p, lam, eta):
    """``filter_step`` over the tokens of ``[B, L, ...]`` inputs from (lam, eta); returns y, y_var
    ``[B, L, H, P]`` and the final (lam, eta)."""
    ys, yvars = [], []
    for t in range(v.shape[1]):
        y, y_var, lam, eta = filter_step(v[:, t], lambda_v[:, t], k[:, t], q[:, t], a, p, lam, eta)
        ys.append(y)
        yvars.append(y_var)
    return torch.stack(ys, 1), torch.stack(yvars, 1), lam, eta


# ---------------------------------------------------------------------- causal conv


def new_window(x: torch.Tensor, window: Optional[torch.Tensor], K: int,
                lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The next call's window ``[B, M, K-1]`` in x's dtype, in its own memory (an inference state
    must not keep the whole of x alive): the K-1 inputs of ``[window | x]`` before the end, or,
    with ``lengths`` ``[B]``, before row b's position ``lengths[b]`` (the rest is padding)."""
    B, L, M = x.shape
    xt = x.transpose(1, 2)
    if lengths is not None:
        past = window.to(x.dtype) if window is not None else x.new_zeros(B, M, K - 1)
        idx = lengths[:, None].to(x.device) + torch.arange(K - 1, device=x.device)  # [window | x] index
        return torch.cat([past, xt], dim=-1).gather(2, idx[:, None, :].expand(-1, M, -1))
    if L >= K - 1:
        return xt[..., L - (K - 1):].contiguous()
    prev = window[..., L:].to(x.dtype) if window is not None else x.new_zeros(B, M, K - 1 - L)
    return torch.cat([prev, xt], dim=-1)


def torch_causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    window: Optional[torch.Tensor] = None,
    position_in_doc: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    lengths: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d, then an optional SiLU: ``y[b, t] = act(bias + Σ_{j<K}
    weight[:, K-1-j] · x[b, t-j])``, one shifted multiply-add per tap.

    x ``[B, L, M]``; weight ``[M, K]`` or ``[M, 1, K]``; bias ``[M]``; window ``[B, M, K-1]`` the
    K-1 inputs before x, oldest first (zeros if None); position_in_doc ``[L]``: taps with lag
    j > position_in_doc[t] read zero (each packed document starts from zeros); ``lengths``: see
    :func:`new_window`. Accumulates in fp32 (fp64 for fp64 inputs) and rounds once, at the
    output. Returns ``(y [B, L, M] in x's dtype, new window)``.
    """
    B, L, M = x.shape
    K = weight.shape[-1]
    dtype = state_dtype(x)
    w = weight.reshape(M, K).to(dtype)
    past = window.to(dtype) if window is not None else x.new_zeros(B, M, K - 1, dtype=dtype)
    padded = torch.cat([past.transpose(1, 2), x.to(dtype)], dim=1)  # [B, K-1+L, M]
    y = bias.to(dtype) if bias is not None else torch.zeros((), dtype=dtype, device=x.device)
    for lag in range(K):
        tap = padded[:, K - 1 - lag : K - 1 - lag + L] * w[:, K - 1 - lag]
        if position_in_doc is not None and lag > 0:
            tap = tap * (position_in_doc >= lag).to(dtype)[None, :, None]
        y = y + tap
    if activation == "silu":
        y = F.silu(y)
    return y.to(x.dtype), new_window(x, window, K, lengths)
