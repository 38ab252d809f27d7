"""KLA language models on megatron-core: config, specs, stack, model, counts."""
from .config import KLAModelConfig, load_model_config
from .flops import flops_per_token, num_parameters
from .kla_model import KLAModel, build_kla_model

__all__ = ["KLAModel", "KLAModelConfig", "build_kla_model", "flops_per_token", "load_model_config", "num_parameters"]
