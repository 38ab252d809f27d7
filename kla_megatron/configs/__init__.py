"""The shipped configs, package data so an installed wheel finds them: run configs
(``<name>.yaml``, loaded by ``kla_megatron.training.config.load_run_config``) and model configs
(``models/<name>.yaml``, loaded by ``kla_megatron.models.load_model_config``). In a checkout,
the top-level ``configs`` is a link to this directory, so ``--config configs/x.yaml`` works."""
from pathlib import Path

RUN_CONFIG_DIR = Path(__file__).resolve().parent
MODEL_CONFIG_DIR = RUN_CONFIG_DIR / "models"
