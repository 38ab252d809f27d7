"""``KLAModelConfig``: the architecture of a KLA / hybrid language model, loaded from YAML.

Only the architecture lives here: the KLA mixers' settings are one ``KLAMixerConfig``
(``cfg.mixer``), how the model runs (scan kernels, recompute, CP order) is a
``KLARuntimeConfig`` passed next to it, and parallelism and precision are passed to
``to_transformer_config(**overrides)``. Named configs are package data,
``kla_megatron/configs/models/<name>.yaml`` (``load_model_config("kla_125m")``).

YAML form: the model files keep the mixer's settings at the top level under the names users
know (``kla_heads``, ``d_state``, ``kla_var_rank``, ...); :data:`MIXER_FLAT_NAMES` is the one
place that maps them onto ``KLAMixerConfig``. ``to_dict`` writes the nested form
(``mixer: {...}``); :meth:`KLAModelConfig.from_dict` reads both, so checkpoints written with the
flat form (older ``model_config.yaml`` files) still load.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from kla_megatron.configs import MODEL_CONFIG_DIR
from kla_megatron.layers.kla_mixer import KLAMixerConfig

LAYER_SYMBOLS = {"K": "KLA", "*": "self-attention", "-": "MLP"}
# The flat (top-level) YAML name of each KLAMixerConfig field that is not its own name.
MIXER_FLAT_NAMES = {"num_heads": "kla_heads", "var_rank": "kla_var_rank"}
# Run settings that older model files and checkpoints carried next to the architecture; they
# now live in KLARuntimeConfig (the run config's train.kla_backend / train.recompute).
RUNTIME_KEYS = {"scan_backend": "train.kla_backend", "recompute_scan": "train.recompute: selective"}
# The vocabulary is padded to a multiple of this (and of TP) so the embedding splits over any
# power-of-two TP size and checkpoints reshard between TP sizes.
VOCAB_PAD_MULTIPLE = 128
# The architecture stored next to a checkpoint's weights (trainer and converter).
MODEL_CONFIG_FILE = "model_config.yaml"


def mixer_flat_name(name: str) -> str:
    """The top-level YAML name of a ``KLAMixerConfig`` field."""
    return MIXER_FLAT_NAMES.get(name, name)


@dataclass(kw_only=True)
class KLAModelConfig:
    """Architecture of a KLA language model."""

    name: str = "kla"
    """Run-facing name (matches the YAML file name)."""
    vocab_size: int
    """Vocabulary size of the tokenizer (the model's is ``padded_vocab_size(tp)``)."""
    hidden_size: int
    """Model width D."""
    num_layers: int
    """Number of layers (= len(layer_pattern))."""
    layer_pattern: Optional[str] = None
    """One symbol per layer: `K` KLA, `*` self-attention, `-` MLP. Default: `K-` repeated."""
    mixer: KLAMixerConfig = field(default_factory=KLAMixerConfig)
    """The KLA layers' settings (flat YAML keys: kla_heads, d_state, expand, conv_kernel, preset,
    kla_var_rank, ssm_lr_mult, dt_min, dt_max, dt_init_floor, p_init, lambda_skip_init)."""
    num_attention_heads: int = 8
    """Heads of `*` layers (megatron also needs it for pure KLA models: any divisor of D)."""
    num_query_groups: Optional[int] = None
    """GQA groups of `*` layers (None: multi-head attention)."""
    ffn_hidden_size: Optional[int] = None
    """MLP hidden size (default: SwiGLU ≈ 8/3·D rounded to 64; 4·D for a GELU MLP)."""
    swiglu: bool = True
    """SwiGLU MLP (else GELU)."""
    normalization: str = "RMSNorm"
    """"RMSNorm" or "LayerNorm"."""
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    position_embedding: str = "none"
    """"none" (KLA needs no positions) or "rope" (for the `*` layers)."""
    rotary_base: int = 10000
    max_seq_len: int = 2048
    """Longest training sequence (rope tables; the KLA layers have no limit)."""
    init_std: float = 0.02

    def __post_init__(self):
        if self.layer_pattern is None:
            self.layer_pattern = ("K-" * self.num_layers)[: self.num_layers]
        bad = sorted({c for c in self.layer_pattern if c not in LAYER_SYMBOLS})
        if bad:
            raise ValueError(
                f"layer_pattern {self.layer_pattern!r} has unknown symbols {bad}; use only "
                + ", ".join(f"'{k}' ({v})" for k, v in LAYER_SYMBOLS.items())
            )
        if len(self.layer_pattern) != self.num_layers:
            raise ValueError(
                f"layer_pattern has {len(self.layer_pattern)} symbols but num_layers={self.num_layers}; "
                f"make num_layers equal len(layer_pattern)"
            )
        if self.position_embedding not in ("none", "rope"):
            raise ValueError(f"position_embedding must be 'none' or 'rope', got {self.position_embedding!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}; choose a divisor of hidden_size"
            )
        if self.ffn_hidden_size is None:
            self.ffn_hidden_size = (
                64 * math.ceil(8 * self.hidden_size / 3 / 64) if self.swiglu else 4 * self.hidden_size
            )
        if not isinstance(self.mixer, KLAMixerConfig):
            raise TypeError(f"KLAModelConfig.mixer must be a KLAMixerConfig, got {type(self.mixer).__name__}; "
                            "build configs from YAML keys with KLAModelConfig.from_dict")
        self.mixer.validate(self.hidden_size)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(cls, data: dict, source: str = "model config", *, runtime_keys: str = "warn") -> "KLAModelConfig":
        """A config from its YAML mapping: the flat form (mixer keys at the top level, as the
        model files write them) or the nested form (``mixer: {...}``, as ``to_dict`` writes it).
        Unknown keys raise ``ValueError`` naming them; the old runtime keys (``scan_backend``,
        ``recompute_scan``) are dropped, with a notice naming the run setting that replaced them
        unless ``runtime_keys="drop"`` (files the programs wrote themselves: checkpoints)."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a mapping of model config keys at the top level")
        data = dict(data)
        mixer = data.pop("mixer", None) or {}
        if not isinstance(mixer, dict):
            raise ValueError(f"{source}: 'mixer' must be a mapping of KLA mixer settings, got {mixer!r}")
        mixer = dict(mixer)
        _drop_runtime_keys(data, source, warn=runtime_keys == "warn")
        flat = {mixer_flat_name(f.name): f.name for f in fields(KLAMixerConfig)}
        own = set(cls.flat_keys()) - set(flat)
        for key in [k for k in data if k in flat]:
            if flat[key] in mixer:
                raise ValueError(f"{source}: '{key}' is set both at the top level and as mixer.{flat[key]}; keep one")
            mixer[flat[key]] = data.pop(key)
        unknown = sorted(set(data) - own)
        if unknown:
            raise ValueError(f"{source}: unknown model config keys {unknown}; known keys: {sorted(own | set(flat))}")
        bad = sorted(set(mixer) - set(flat.values()))
        if bad:
            raise ValueError(f"{source}: unknown mixer keys {bad}; known keys: {sorted(flat.values())}")
        return cls(mixer=KLAMixerConfig(**mixer), **data)

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "KLAModelConfig":
        return cls.from_dict(read_model_yaml(path), str(path))

    def to_dict(self) -> dict:
        """The nested form (``mixer: {...}``), as checkpoints store it."""
        return dataclasses.asdict(self)

    @classmethod
    def flat_keys(cls) -> list:
        """Every key of the flat form, in order: the model's fields, then the mixer's (YAML names)."""
        return ([f.name for f in fields(cls) if f.name != "mixer"]
                + [mixer_flat_name(f.name) for f in fields(KLAMixerConfig)])

    def to_flat(self) -> dict:
        """The flat form: the mixer's settings at the top level under their YAML names."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "mixer"}
        out.update({mixer_flat_name(f.name): getattr(self.mixer, f.name) for f in fields(self.mixer)})
        return out

    # ------------------------------------------------------------------ derived

    @property
    def d_inner(self) -> int:
        return self.mixer.d_inner(self.hidden_size)

    def padded_vocab_size(self, tp: int = 1) -> int:
        """The model's vocabulary: ``vocab_size`` rounded up to a multiple of lcm(128, TP) (the same
        for every power-of-two TP, so checkpoints reshard)."""
        multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
        return -(-self.vocab_size // multiple) * multiple

    def with_padded_vocab(self, tp: int = 1) -> "KLAModelConfig":
        """This config with ``vocab_size`` replaced by ``padded_vocab_size(tp)`` (what the trainer builds)."""
        padded = self.padded_vocab_size(tp)
        return dataclasses.replace(self, vocab_size=padded) if padded != self.vocab_size else self

    def is_padding_of(self, stored_vocab: int) -> bool:
        """Whether a checkpoint's embedding rows ``stored_vocab`` are this vocabulary padded by the trainer."""
        return stored_vocab > self.vocab_size and stored_vocab % VOCAB_PAD_MULTIPLE == 0

    def to_transformer_config(self, **overrides):
        """A megatron ``TransformerConfig`` for this architecture; ``overrides`` set parallelism
        and precision (tensor_model_parallel_size, sequence_parallel, pipeline_model_parallel_size,
        bf16, params_dtype, recompute_granularity, ...). CPU-safe defaults without CUDA."""
        from megatron.core.transformer import TransformerConfig

        tp = overrides.get("tensor_model_parallel_size", 1)
        self.mixer.validate(self.hidden_size, tp)
        params_dtype = overrides.get("params_dtype", torch.float32)
        kwargs = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            gated_linear_unit=self.swiglu,
            activation_func=F.silu if self.swiglu else F.gelu,
            add_bias_linear=False,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_eps,
            init_method_std=self.init_std,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            bias_dropout_fusion=False,
            bias_activation_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            use_cpu_initialization=not torch.cuda.is_available(),
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)


def _drop_runtime_keys(data: dict, source: str, warn: bool) -> None:
    for key, replacement in RUNTIME_KEYS.items():
        if key in data:
            value = data.pop(key)
            if warn:
                warnings.warn(f"{source}: '{key}: {value}' is a run setting, no longer part of the model config; "
                              f"it is ignored here (set {replacement} in the run config, or pass "
                              f"KLARuntimeConfig({key}=...) to build_kla_model)", FutureWarning, stacklevel=4)


def model_config_path(name_or_path: Union[str, Path]) -> Path:
    """``"kla_125m"`` → ``kla_megatron/configs/models/kla_125m.yaml``; a path as is
    (FileNotFoundError naming the available configs when neither exists)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = MODEL_CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no model config {str(name_or_path)!r}; available: {available}")
    return path


def read_model_yaml(path: Union[str, Path]) -> dict:
    """The keys a model YAML file sets (its ``name`` defaults to the file name)."""
    from kla_megatron.yaml_io import parse_yaml

    data = parse_yaml(Path(path).read_text(), str(path))
    data = {} if data is None else data
    if isinstance(data, dict):
        data.setdefault("name", Path(path).stem)
    return data


def load_model_config(name_or_path: Union[str, Path]) -> KLAModelConfig:
    """The model config of a name in ``kla_megatron/configs/models/`` or of a YAML path."""
    path = model_config_path(name_or_path)
    return KLAModelConfig.from_dict(read_model_yaml(path), str(path))


def save_model_config(cfg: KLAModelConfig, directory: Union[str, Path]) -> Path:
    """Write ``directory/model_config.yaml`` (the nested form) and return its path."""
    import yaml

    path = Path(directory) / MODEL_CONFIG_FILE
    with open(path, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    return path


def read_stored_model_config(path: Union[str, Path]) -> KLAModelConfig:
    """A checkpoint's ``model_config.yaml``: the nested form, or the flat form older versions
    wrote (with their run settings ``scan_backend`` / ``recompute_scan``, dropped here)."""
    return KLAModelConfig.from_dict(read_model_yaml(path), str(path), runtime_keys="drop")
