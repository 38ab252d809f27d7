"""KLA language models on megatron-core: config, specs, stack, model, counts."""
from kla_megatron.layers import KLAMixerConfig, KLARuntimeConfig

from .config import MODEL_CONFIG_FILE, KLAModelConfig, load_model_config, read_stored_model_config, save_model_config
from .flops import flops_per_token, num_parameters
from .kla_model import KLAModel, build_kla_model

__all__ = ["MODEL_CONFIG_FILE", "KLAMixerConfig", "KLAModel", "KLAModelConfig", "KLARuntimeConfig", "build_kla_model",
           "flops_per_token", "load_model_config", "num_parameters", "read_stored_model_config", "save_model_config"]
