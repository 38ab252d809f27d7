"""KLA scan ops: ``kla_scan`` (training), ``kla_decode_step`` (inference), ``discretize``."""
from ..kla_core import discretize
from .scan import BACKENDS, kla_decode_step, kla_scan, triton_available

__all__ = ["BACKENDS", "discretize", "kla_decode_step", "kla_scan", "triton_available"]
