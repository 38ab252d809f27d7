"""Hugging Face directories: export (safetensors + config.json with ``auto_map`` + the modeling
code + tokenizer) and a checked import (clear errors for a wrong config, missing
shards, truncated safetensors files, missing/unexpected/mis-shaped tensors)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Optional

import torch

from kla_megatron.hf import modeling_kla
from kla_megatron.ops import kla_core

MODELING_FILES = (Path(modeling_kla.__file__), Path(kla_core.__file__))
"""Copied into every export: ``modeling_kla.py`` imports ``kla_core.py`` from its own directory."""
AUTO_MAP = {"AutoConfig": "modeling_kla.KLAConfig", "AutoModelForCausalLM": "modeling_kla.KLAForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def make_config(arch: dict, **extra) -> modeling_kla.KLAConfig:
    config = modeling_kla.KLAConfig(**arch, **extra)
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["KLAForCausalLM"]
    return config


def expected_tensors(config: modeling_kla.KLAConfig) -> Dict[str, torch.Tensor]:
    """Name → (meta) tensor of every parameter the HF model has for ``config``."""
    with torch.device("meta"):
        model = modeling_kla.KLAForCausalLM(config)
    return dict(model.state_dict())


def _save_tensors(state: Dict[str, torch.Tensor], out_dir: Path, max_shard_size) -> None:
    try:
        from huggingface_hub import save_torch_state_dict
    except ImportError:
        save_torch_state_dict = None
    if save_torch_state_dict is not None:
        save_torch_state_dict(state, str(out_dir), max_shard_size=max_shard_size)
    else:
        from safetensors.torch import save_file

        save_file(state, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})


def export_hf(state: Dict[str, torch.Tensor], config: modeling_kla.KLAConfig, out_dir, *,
              tokenizer_model: Optional[str] = None, dtype: Optional[torch.dtype] = None,
              max_shard_size="5GB") -> Path:
    """Write an HF directory loadable with ``trust_remote_code=True`` (no kla_megatron needed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from .names import check_state_dict

    check_state_dict(state, expected_tensors(config), "HF model")
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in state.items()}
    if dtype is not None:
        config.dtype = str(dtype).replace("torch.", "")
    if tokenizer_model is not None:  # checked (and written) first: a bad tokenizer leaves no half export
        export_tokenizer(tokenizer_model, out_dir, max_vocab=config.vocab_size)
    _save_tensors(state, out_dir, max_shard_size)
    _normal_permissions(out_dir)
    config.save_pretrained(str(out_dir))
    for source in MODELING_FILES:
        shutil.copyfile(source, out_dir / source.name)
    return out_dir


def _normal_permissions(out_dir: Path) -> None:
    """huggingface_hub writes shards through a private temp file (mode 0600): give the tensor
    files the mode of any file created here (0666 minus the umask), like the other files."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    for f in out_dir.iterdir():
        if f.name.startswith("model") and f.name.endswith((".safetensors", ".json")) and f.is_file():
            os.chmod(f, 0o666 & ~umask)


def export_tokenizer(model_file, out_dir, max_vocab: Optional[int] = None) -> None:
    """The training tokenizer (any ``kla_megatron.tokenizers`` kind) as a standard transformers
    tokenizer (``tokenizer.json`` + ``PreTrainedTokenizerFast``, no custom code; the ids our data
    pipeline produces: no BOS/EOS added). A sentencepiece ``.model`` is converted by
    ``hf_tokenizer.py`` (and copied as ``tokenizer.model``); a ``tokenizer.json`` or a tiktoken
    rank file by ``kla_megatron/tokenizers/hf_export.py``. ``max_vocab``: the model's vocabulary
    size, which must hold every id of the tokenizer."""
    from kla_megatron import tokenizers

    kind, file = tokenizers.detect_kind(model_file)
    n_tokens = tokenizers.load(file).vocab_size
    if max_vocab is not None and n_tokens > max_vocab:
        raise ValueError(f"tokenizer {model_file} has {n_tokens} tokens but the model's vocab_size is {max_vocab}: "
                         "not the tokenizer this model was trained with")
    if kind == "sentencepiece":
        from .hf_tokenizer import export

        export(file, out_dir)
    else:
        from kla_megatron.tokenizers.hf_export import export

        export(tokenizers.load(file), out_dir)


def read_config(hf_dir) -> modeling_kla.KLAConfig:
    """The ``KLAConfig`` of an HF directory; ValueError if it is missing or not a KLA config."""
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{hf_dir} has no config.json (not a Hugging Face model directory)")
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if data.get("model_type") != "kla":
        raise ValueError(f"{path}: model_type is {data.get('model_type')!r}, expected 'kla'")
    data = {k: v for k, v in data.items() if k not in ("model_type", "transformers_version")}
    try:
        return modeling_kla.KLAConfig(**data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: invalid KLA config: {exc}") from exc


def _read_safetensors(file: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.exists():
        raise FileNotFoundError(f"missing safetensors shard {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"corrupt or truncated safetensors file {file}: {exc}") from exc


def read_state(hf_dir) -> Dict[str, torch.Tensor]:
    """All tensors of an HF directory (single file or sharded with an index)."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
        absent = [f for f in files if not (hf_dir / f).exists()]
        if absent:
            raise FileNotFoundError(f"{hf_dir}: shards listed in {INDEX_FILE} are missing: {absent}")
        state = {}
        for f in files:
            state.update(_read_safetensors(hf_dir / f))
        not_indexed = sorted(set(state) - set(weight_map))
        unlisted = sorted(set(weight_map) - set(state))
        if unlisted or not_indexed:
            raise ValueError(f"{hf_dir}: shards disagree with {INDEX_FILE}: tensors listed but absent {unlisted}, "
                             f"present but not listed {not_indexed}")
        return state
    if not (hf_dir / SINGLE_FILE).exists():
        raise FileNotFoundError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    return _read_safetensors(hf_dir / SINGLE_FILE)


def load_hf(hf_dir):
    """(KLAConfig, state dict) of an HF directory, checked against the architecture."""
    from .names import check_state_dict

    config = read_config(hf_dir)
    state = read_state(hf_dir)
    check_state_dict(state, expected_tensors(config), f"HF checkpoint {hf_dir}")
    return config, state


def hf_model(config: modeling_kla.KLAConfig, state: Dict[str, torch.Tensor], dtype=torch.float32):
    """A ``KLAForCausalLM`` holding ``state`` (strict load)."""
    model = modeling_kla.KLAForCausalLM(config).to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
    return model.eval()
