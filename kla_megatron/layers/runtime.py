"""``KLARuntimeConfig``: how a KLA model runs, as opposed to what it is.

The architecture (``KLAModelConfig`` / ``KLAMixerConfig``) decides the parameters and the
function the model computes; the runtime only decides how that function is evaluated: which
scan kernels and whether the scan is recomputed in backward. (The context-parallel order is
not a choice: it is megatron's, ``parallel/sharding.MODEL_CP_LAYOUT``, which attention and the
data path follow too.) The trainer builds one from the run config
(``RunConfig.runtime()``) and hands it to ``build_kla_model`` next to the model config, so
nothing rewrites the model config after loading.
"""
from __future__ import annotations

from dataclasses import dataclass

from kla_megatron.ops.kla.scan import BACKENDS as SCAN_BACKENDS


@dataclass(frozen=True, kw_only=True)
class KLARuntimeConfig:
    """Execution choices of the KLA mixers (none of them changes the parameters)."""

    scan_backend: str = "auto"
    """kla_scan backend: "auto" (Triton on CUDA, the fastest exact torch scan otherwise),
    "recurrent", "torch", "triton", "naive". The conv, sensors and gate follow it."""
    recompute_scan: bool = False
    """Selective recompute: keep only the post-conv z and the gate for backward and run the sensor
    activations, the scan and the output gate again there (train.recompute=selective)."""

    def __post_init__(self):
        if self.scan_backend not in SCAN_BACKENDS:
            raise ValueError(f"scan_backend must be one of {list(SCAN_BACKENDS)}, got {self.scan_backend!r}")
