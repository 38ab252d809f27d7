"""The public causal depthwise conv1d: input checks and backend dispatch.

Shapes (B batch rows, L tokens, M channels, K taps):

- ``x``                ``[B, L, M]``, any strides with ``x.stride(-1) == 1`` (e.g. the z half of
  an in_proj output ``[L, B, 2M]`` seen as ``zg.transpose(0, 1)[..., :M]``: read in place)
- ``weight``           ``[M, K]`` or ``[M, 1, K]`` (``nn.Conv1d`` / ``KLAMixer.conv_weight``)
- ``bias``             ``[M]`` or None
- ``window``           ``[B, M, K-1]``: the K-1 inputs before x, oldest first (zeros if None)
- ``position_in_doc``  ``[L]`` int: each token's position inside its packed document
- ``y``                ``[B, L, M]`` contiguous; ``new_window`` ``[B, M, K-1]``
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..kla.scan import triton_available
from ..kla_core import torch_causal_conv1d

BACKENDS = ("auto", "torch", "triton")
ACTIVATIONS = (None, "silu")
_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


def _check_shapes(x, weight, bias, window, position_in_doc) -> None:
    if x.dim() != 3 or 0 in x.shape:
        raise ValueError(f"causal_conv1d: `x` must be a non-empty [B, L, M] tensor, got shape {tuple(x.shape)}")
    B, L, M = x.shape
    if not (weight.dim() == 2 or (weight.dim() == 3 and weight.shape[1] == 1)) or weight.shape[0] != M:
        raise ValueError(f"causal_conv1d: `weight` must have shape [M, K] or [M, 1, K] with M={M}, "
                         f"got {tuple(weight.shape)}")
    K = weight.shape[-1]
    if K < 1:
        raise ValueError("causal_conv1d: `weight` must have at least one tap (K ≥ 1)")
    expected = {"bias": (bias, (M,)), "window": (window, (B, M, K - 1)), "position_in_doc": (position_in_doc, (L,))}
    for name, (t, want) in expected.items():
        if t is not None and tuple(t.shape) != want:
            raise ValueError(f"causal_conv1d: `{name}` must have shape {list(want)}, got {tuple(t.shape)}")


def _check_dtypes(x, weight, bias, window, position_in_doc) -> None:
    for name, t in (("x", x), ("weight", weight), ("bias", bias), ("window", window)):
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"causal_conv1d: `{name}` must be bf16, fp16, fp32 or fp64, got {t.dtype}")
    if position_in_doc is not None and (position_in_doc.is_floating_point() or position_in_doc.is_complex()
                                        or position_in_doc.dtype == torch.bool):
        raise ValueError(f"causal_conv1d: `position_in_doc` must be an integer tensor, got {position_in_doc.dtype}")
    tensors = {"x": x, "weight": weight, "bias": bias, "window": window, "position_in_doc": position_in_doc}
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"causal_conv1d: `{name}` is on {t.device} but `x` is on {x.device}")


def _resolve_backend(backend: str, x: torch.Tensor, K: int) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"causal_conv1d: unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        if x.device.type != "cuda" or x.dtype == torch.float64 or not triton_available():
            return "torch"
        from .triton_conv import MAX_K

        return "triton" if K <= MAX_K else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("causal_conv1d: backend='triton' needs Triton (pip install triton) on Linux")
    return backend


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    window: Optional[torch.Tensor] = None,
    position_in_doc: Optional[torch.Tensor] = None,
    activation: Optional[str] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv1d over the token axis, then an optional SiLU (shapes above).

    ``y[b, t, m] = act(bias[m] + Σ_{j<K} weight[m, K-1-j] · x[b, t-j, m])``: tap (lag) j uses
    weight column K-1-j; x before t = 0 comes from ``window``; with ``position_in_doc``, taps with
    lag j > position_in_doc[t] read zero (each packed document starts from zeros). The window is
    read in x's dtype; the rest is computed in fp32 (fp64 for fp64 inputs); y and new_window in
    x's dtype.

    Args:
        activation: None or ``"silu"`` (applied after the bias).
        backend: ``"triton"`` (custom ops ``kla_conv::fwd``/``bwd``; fp32 compute, K ≤ 4, no
            fp64), ``"torch"`` (plain PyTorch) or ``"auto"`` (Triton on CUDA where it applies,
            else torch).

    Returns:
        ``(y [B, L, M], new_window [B, M, K-1])``: new_window holds the last K-1 inputs of
        ``[window | x]`` (the next call's window). Gradients reach x, weight, bias and window.

    Example (a 2-token continuation of a document, then a new 3-token one)::

        >>> B, L, M, K = 1, 5, 8, 4
        >>> x, w, b = torch.randn(B, L, M), torch.randn(M, K), torch.randn(M)
        >>> y, win = causal_conv1d(x, w, b, window=torch.randn(B, M, K - 1), activation="silu",
        ...                        position_in_doc=torch.tensor([7, 8, 0, 1, 2]))
        >>> y.shape, win.shape
        (torch.Size([1, 5, 8]), torch.Size([1, 8, 3]))
    """
    _check_shapes(x, weight, bias, window, position_in_doc)
    _check_dtypes(x, weight, bias, window, position_in_doc)
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: `activation` must be one of {ACTIVATIONS}, got {activation!r}")
    if window is not None:
        window = window.to(x.dtype)  # as the pre-fusion loop did (an fp32 inference state, bf16 x)
    kw = dict(window=window, position_in_doc=position_in_doc, activation=activation)
    if _resolve_backend(backend, x, weight.shape[-1]) == "torch":
        return torch_causal_conv1d(x, weight, bias, **kw)
    from .triton_conv import triton_causal_conv1d

    return triton_causal_conv1d(x, weight, bias, **kw)
