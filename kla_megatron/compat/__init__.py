"""Compatibility shims for running megatron-core where it was not written to run."""
from .cpu import cpu_shim_hits, enable_cpu_megatron

__all__ = ["cpu_shim_hits", "enable_cpu_megatron"]
