"""Causal depthwise conv1d (+ SiLU): ``causal_conv1d`` (Triton kernels on CUDA, PyTorch elsewhere)."""
from ..kla_core import torch_causal_conv1d
from .causal_conv1d import ACTIVATIONS, BACKENDS, causal_conv1d, triton_available

__all__ = ["ACTIVATIONS", "BACKENDS", "causal_conv1d", "torch_causal_conv1d", "triton_available"]
