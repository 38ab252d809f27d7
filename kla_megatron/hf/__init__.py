"""Hugging Face model (``KLAConfig``, ``KLAForCausalLM``). ``modeling_kla.py`` travels with every
exported checkpoint, next to a copy of ``kla_megatron/ops/kla_core.py`` that it imports as
``.kla_core``; here that name is the package's own module, so the two share one source."""
import sys

from kla_megatron.ops import kla_core

sys.modules[f"{__name__}.kla_core"] = kla_core  # what `from .kla_core import ...` in modeling_kla.py finds

from .modeling_kla import KLACache, KLAConfig, KLAForCausalLM  # noqa: E402  (after the alias)

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
