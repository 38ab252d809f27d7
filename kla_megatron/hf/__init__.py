"""Hugging Face model (``KLAConfig``, ``KLAForCausalLM``). ``modeling_kla.py`` is one
self-contained file: it travels with every exported checkpoint."""
from .modeling_kla import KLACache, KLAConfig, KLAForCausalLM

__all__ = ["KLAConfig", "KLAForCausalLM", "KLACache"]


def _register_auto_classes() -> None:
    """With our package installed, ``AutoModelForCausalLM`` knows "kla" without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoConfig.register("kla", KLAConfig)
        AutoModelForCausalLM.register(KLAConfig, KLAForCausalLM)
    except ValueError:  # already registered
        pass


_register_auto_classes()
