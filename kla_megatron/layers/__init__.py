"""megatron-core layers for KLA: the mixer, the residual layer, norms, decoding state."""
from .inference_state import KLAInferenceState, KLALayerState
from .kla_layer import KLALayer, KLALayerSubmodules
from .kla_mixer import KLAMixer, KLAMixerConfig, KLAMixerSubmodules
from .norm import KLANorm
from .runtime import KLARuntimeConfig

__all__ = [
    "KLAInferenceState",
    "KLALayer",
    "KLALayerState",
    "KLALayerSubmodules",
    "KLAMixer",
    "KLAMixerConfig",
    "KLAMixerSubmodules",
    "KLANorm",
    "KLARuntimeConfig",
]
