"""Sequence-mixer math and kernels (bottom of the dependency chain: imports nothing above it)."""
from .kla import discretize, kla_decode_step, kla_scan

__all__ = ["discretize", "kla_decode_step", "kla_scan"]
