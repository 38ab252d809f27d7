"""Causal depthwise conv1d (+ SiLU): ``causal_conv1d`` (Triton kernels on CUDA, PyTorch elsewhere)."""
from .causal_conv1d import ACTIVATIONS, BACKENDS, causal_conv1d, triton_available
from .torch_conv import torch_causal_conv1d

__all__ = ["ACTIVATIONS", "BACKENDS", "causal_conv1d", "torch_causal_conv1d", "triton_available"]
