"""The public KLA scan API: input checks and backend dispatch.

Glossary (names from the paper, docs/kla.md#filter; one lane = (batch, head, channel, state)):

- ``v``         observed value per channel, ``[B, L, H, P]``
- ``lambda_v``  its precision Λv > 0 (inverse observation variance), ``[B, L, H, P]``
- ``k``, ``q``  key (sensor gain) and query (read-out weights) per state, ``[B, L, H, S]``
- ``a``         per-step decay ā ∈ (0, 1], ``[H, P, S]``
- ``p``         per-step process noise p̄ ≥ 0, ``[H, P, S]``
- ``lam``, ``eta``  the belief in information form: precision λ and information
  vector η = λ·μ, each ``[N, H, P, S]`` (N sequences), kept in fp32
- ``y``, ``y_var``  read-outs Σ_s q·μ and Σ_s q²/λ, ``[B, L, H, P]``
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kla_core import filter_step
from .chunk_torch import torch_kla_scan
from .naive import naive_kla_scan
from .recurrent import recurrent_kla_scan

State = Tuple[torch.Tensor, torch.Tensor]
BACKENDS = ("auto", "naive", "recurrent", "torch", "triton")
_IO_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
_STATE_DTYPES = (torch.float32, torch.float64)


def _shape_error(name, expected, got):
    return ValueError(f"kla_scan: `{name}` must have shape {expected}, got {tuple(got)}")


def _check_shapes(v, lambda_v, k, q, a, p, initial_state, cu_seqlens):
    if v.dim() != 4:
        raise ValueError(f"kla_scan: `v` must be 4-D [B, L, H, P], got shape {tuple(v.shape)}")
    B, L, H, P = v.shape
    if k.dim() != 4:
        raise ValueError(f"kla_scan: `k` must be 4-D [B, L, H, S], got shape {tuple(k.shape)}")
    S = k.shape[-1]
    for name, x, want in (
        ("lambda_v", lambda_v, (B, L, H, P)),
        ("k", k, (B, L, H, S)),
        ("q", q, (B, L, H, S)),
        ("a", a, (H, P, S)),
        ("p", p, (H, P, S)),
    ):
        if tuple(x.shape) != want:
            raise _shape_error(name, list(want), x.shape)
    if L == 0:
        raise ValueError("kla_scan: sequence length L must be at least 1")
    n_seq = B
    if cu_seqlens is not None:
        if B != 1:
            raise ValueError(f"kla_scan: with `cu_seqlens` the batch size must be 1 (packed), got B={B}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("kla_scan: `cu_seqlens` must be a 1-D integer tensor [N + 1] with N ≥ 1")
        n_seq = cu_seqlens.numel() - 1
    if initial_state is not None:
        if not (isinstance(initial_state, (tuple, list)) and len(initial_state) == 2):
            raise ValueError("kla_scan: `initial_state` must be a pair (lam, eta)")
        for name, s in zip(("lam", "eta"), initial_state):
            if tuple(s.shape) != (n_seq, H, P, S):
                raise _shape_error(f"initial_state.{name}", [n_seq, H, P, S], s.shape)


def _check_dtypes(v, lambda_v, k, q, a, p, initial_state):
    io = {x.dtype for x in (v, lambda_v, k, q)}
    if len(io) != 1 or v.dtype not in _IO_DTYPES:
        raise ValueError(
            "kla_scan: v, lambda_v, k, q must share one float dtype (bf16, fp16, fp32 or fp64), "
            f"got {[str(x.dtype) for x in (v, lambda_v, k, q)]}"
        )
    state = [a, p] + list(initial_state or ())
    if len({x.dtype for x in state}) != 1 or a.dtype not in _STATE_DTYPES:
        raise ValueError(
            "kla_scan: a, p and the initial state must share one dtype, fp32 or fp64, "
            f"got {[str(x.dtype) for x in state]}"
        )
    if (v.dtype == torch.float64) != (a.dtype == torch.float64):
        raise ValueError(
            f"kla_scan: float64 must be used throughout or not at all, got inputs {v.dtype} "
            f"and a/p {a.dtype}"
        )
    devices = {x.device for x in [v, lambda_v, k, q] + state}
    if len(devices) != 1:
        raise ValueError(f"kla_scan: all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_values(lambda_v, a, p, initial_state, cu_seqlens, L):
    # These read values back to the host: skipped with check_values=False (layers,
    # CUDA graphs), whose inputs are valid by construction.
    if not bool((lambda_v > 0).all()):
        raise ValueError("kla_scan: `lambda_v` must be positive everywhere (it is a precision)")
    if not bool(((a > 0) & (a <= 1)).all()):
        raise ValueError(
            f"kla_scan: `a` must lie in (0, 1], got min {a.min().item():.3g}, max {a.max().item():.3g}"
        )
    if not bool((p >= 0).all()):
        raise ValueError(f"kla_scan: `p` must be non-negative, got min {p.min().item():.3g}")
    if initial_state is not None and not bool((initial_state[0] > 0).all()):
        raise ValueError("kla_scan: initial `lam` must be positive everywhere (it is a precision)")
    if cu_seqlens is not None:
        cs = cu_seqlens.tolist()
        if cs[0] != 0 or cs[-1] != L or any(b <= a_ for a_, b in zip(cs[:-1], cs[1:])):
            raise ValueError(
                f"kla_scan: `cu_seqlens` must start at 0, increase strictly and end at L={L}, got {cs}"
            )


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"kla_scan: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        # Measured (bench/bench_scan_cpu.py, bench/README.md): on the CPU the blocked sequential
        # scan beats the parallel one by 30-240x, with and without grad.
        if device.type == "cpu":
            return "recurrent"
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("kla_scan: backend='triton' needs Triton (pip install triton) on Linux")
    return backend


def triton_available() -> bool:
    """Whether Triton and our kernels import (the scan's and the conv's ``backend="auto"`` ask)."""
    try:
        from . import chunk  # noqa: F401
    except ImportError:
        return False
    return True


def kla_scan(
    v: torch.Tensor,
    lambda_v: torch.Tensor,
    k: torch.Tensor,
    q: torch.Tensor,
    a: torch.Tensor,
    p: torch.Tensor,
    *,
    initial_state: Optional[State] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
    check_values: bool = True,
    deterministic: bool = False,
    output_variance: bool = True,
):
    """Run the KLA filter over a sequence (multi-head; see the glossary above).

    Args:
        v, lambda_v: ``[B, L, H, P]`` values and their precisions (> 0).
        k, q: ``[B, L, H, S]`` keys and queries.
        a, p: ``[H, P, S]`` decay in (0, 1] and process noise ≥ 0, fp32 (or fp64).
        initial_state: ``(lam, eta)``, each ``[N, H, P, S]``; default λ = 1, η = 0.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: ``[N + 1]`` int offsets of packed documents (then ``B`` must be 1);
            the filter restarts from ``initial_state[n]`` at every document start.
        backend: ``"naive"`` (sequential reference), ``"recurrent"`` (blocked sequential
            PyTorch with a hand-written backward: fastest on the CPU), ``"torch"`` (parallel
            PyTorch), ``"triton"`` (CUDA kernels) or ``"auto"`` (recurrent on the CPU, Triton
            on CUDA, else torch).
        check_values: check value constraints (reads back to host: off inside layers, under
            torch.compile and in CUDA graphs).
        deterministic: Triton backward without atomics (bitwise reproducible).
        output_variance: also compute ``y_var`` (else it is returned as None; the Triton
            kernels then skip its arithmetic and memory traffic both ways).

    Returns:
        ``(y, y_var, final_state)``: ``y``, ``y_var`` ``[B, L, H, P]`` in the dtype of ``v`` (``y_var`` None without
        ``output_variance``);
        ``final_state`` is ``(lam, eta)`` ``[N, H, P, S]`` in fp32 (fp64 for fp64 inputs)
        or ``None``.

    Example (two packed documents of lengths 3 and 5)::

        >>> B, L, H, P, S = 1, 8, 2, 4, 3
        >>> v, lv = torch.randn(B, L, H, P), torch.rand(B, L, H, P) + 0.1
        >>> k, q = torch.randn(B, L, H, S), torch.randn(B, L, H, S)
        >>> a, p = torch.full((H, P, S), 0.9), torch.full((H, P, S), 0.01)
        >>> y, y_var, (lam, eta) = kla_scan(v, lv, k, q, a, p, output_final_state=True,
        ...                                 cu_seqlens=torch.tensor([0, 3, 8]))
        >>> lam.shape
        torch.Size([2, 2, 4, 3])
    """
    _check_shapes(v, lambda_v, k, q, a, p, initial_state, cu_seqlens)
    _check_dtypes(v, lambda_v, k, q, a, p, initial_state)
    if check_values:
        _check_values(lambda_v, a, p, initial_state, cu_seqlens, v.shape[1])
    backend = _resolve_backend(backend, v.device)
    args = (v, lambda_v, k, q, a, p, initial_state, output_final_state, cu_seqlens)
    if backend == "recurrent":
        return recurrent_kla_scan(*args, output_variance=output_variance)
    if backend in ("naive", "torch"):
        y, y_var, final = (naive_kla_scan if backend == "naive" else torch_kla_scan)(*args)
        return y, (y_var if output_variance else None), final
    from .triton_scan import triton_kla_scan

    return triton_kla_scan(*args, deterministic=deterministic, output_variance=output_variance)


def kla_decode_step(v, lambda_v, k, q, a, p, state: State, *, backend: str = "auto"):
    """One decoding step. v, lambda_v ``[B, H, P]``; k, q ``[B, H, S]``; a, p ``[H, P, S]``;
    state ``(lam, eta)`` ``[B, H, P, S]``. Returns ``(y, y_var, (lam, eta))`` with y, y_var
    ``[B, H, P]`` in the dtype of ``v`` and the new state in the state's dtype."""
    if v.dim() != 3 or k.dim() != 3:
        raise ValueError(
            f"kla_decode_step: v must be [B, H, P] and k [B, H, S], got {tuple(v.shape)}, {tuple(k.shape)}"
        )
    _check_shapes(v[:, None], lambda_v[:, None], k[:, None], q[:, None], a, p, state, None)
    backend = _resolve_backend(backend, v.device)
    lam, eta = state
    if backend == "triton":
        from .fused_recurrent import triton_kla_step

        y, y_var, lam, eta = triton_kla_step(v, lambda_v, k, q, a, p, lam, eta)
    else:
        y, y_var, lam, eta = filter_step(v, lambda_v, k, q, a, p, lam, eta)
    return y.to(v.dtype), y_var.to(v.dtype), (lam, eta)
