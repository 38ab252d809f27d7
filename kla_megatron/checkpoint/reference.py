"""The paper's reference ``kla`` weights (``SequenceModel`` state dict, H = 1) → our model,
through the one name mapping in ``kla_megatron.models.reference_names``."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import torch

from kla_megatron.models import KLAModelConfig
from kla_megatron.models.reference_names import model_from_reference


def read_reference_state(path) -> Dict[str, torch.Tensor]:
    """A reference state dict from ``.pt``/``.pth`` (torch.save of ``state_dict()``), ``.safetensors``
    or ``.npz`` (entries ``param.<name>``, as in the golden files)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference checkpoint {path} does not exist")
    if path.suffix == ".npz":
        import numpy as np

        data = np.load(path)
        return {k[len("param."):]: torch.from_numpy(np.array(data[k])) for k in data.files if k.startswith("param.")}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k.removeprefix("module."): v for k, v in state.items()}


def reference_config(state: Dict[str, torch.Tensor], *, norm_eps: float = 1e-5, name="kla_reference") -> KLAModelConfig:
    """Infer the ``KLAModelConfig`` of a reference ``SequenceModel`` from its tensor shapes."""
    if "embedding.weight" not in state:
        raise ValueError("not a reference SequenceModel state dict: no 'embedding.weight'")
    vocab, d_model = state["embedding.weight"].shape
    blocks = sorted({int(k.split(".")[1]) for k in state if k.startswith("blocks.")})
    if not blocks:
        raise ValueError("reference state dict has no blocks.<i>.* tensors")
    has_mlp = "blocks.0.mlp.w12.weight" in state
    M, S = state["blocks.0.mixer.delta"].shape
    in_sensor = state["blocks.0.mixer.sensor_proj.weight"].shape[0]
    mamba = "blocks.0.mixer.var_expand.weight" in state
    kw = dict(vocab_size=vocab, hidden_size=d_model, num_layers=len(blocks) * (2 if has_mlp else 1),
              layer_pattern=("K-" if has_mlp else "K") * len(blocks), kla_heads=1, d_state=S, expand=M / d_model,
              conv_kernel=state["blocks.0.mixer.conv.weight"].shape[-1], preset="mamba" if mamba else "plain",
              num_attention_heads=1, norm_eps=norm_eps, tie_embeddings="lm_head.weight" not in state, name=name)
    if mamba:
        kw["kla_var_rank"] = state["blocks.0.mixer.var_expand.weight"].shape[1]
    elif in_sensor != 2 * M + 2 * S:
        raise ValueError(f"reference sensor_proj has {in_sensor} outputs; expected 2·{M} + 2·{S} for the plain preset")
    if has_mlp:
        kw["ffn_hidden_size"] = state["blocks.0.mlp.w3.weight"].shape[1]
    if int(kw["expand"] * d_model) != M:
        raise ValueError(f"reference d_inner {M} is not expand·d_model for d_model {d_model}")
    return KLAModelConfig.from_dict(kw, "reference weights")


def from_reference(state: Dict[str, torch.Tensor], **kw) -> Tuple[KLAModelConfig, Dict[str, torch.Tensor]]:
    """(config, our TP = PP = 1 megatron state dict) for a reference ``SequenceModel``."""
    cfg = reference_config(state, **kw)
    return cfg, model_from_reference(state, has_mlp="-" in cfg.layer_pattern)
