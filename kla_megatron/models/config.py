"""``KLAModelConfig``: the architecture of a KLA / hybrid language model, loaded from YAML.

Only the architecture lives here; parallelism and precision are passed to
``to_transformer_config(**overrides)`` by the trainer. Named configs are
``configs/models/<name>.yaml`` (``load_model_config("kla_125m")``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F

from kla_megatron.layers.kla_mixer import PRESETS, KLAMixerConfig

LAYER_SYMBOLS = {"K": "KLA", "*": "self-attention", "-": "MLP"}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(kw_only=True)
class KLAModelConfig:
    """Architecture of a KLA language model."""

    name: str = "kla"
    """Run-facing name (matches the YAML file name)."""
    vocab_size: int
    """Vocabulary size (padded to a multiple of `make_vocab_size_divisible_by` × TP by the trainer)."""
    hidden_size: int
    """Model width D."""
    num_layers: int
    """Number of layers (= len(layer_pattern))."""
    layer_pattern: Optional[str] = None
    """One symbol per layer: `K` KLA, `*` self-attention, `-` MLP. Default: `K-` repeated."""
    kla_heads: int = 1
    """KLA heads H (d_inner % H == 0, H % TP == 0)."""
    d_state: int = 16
    """KLA state size S per channel."""
    expand: float = 2.0
    """d_inner = expand · hidden_size."""
    conv_kernel: int = 4
    """Causal conv width."""
    preset: str = "plain"
    """KLA sensor preset: "plain" or "mamba"."""
    kla_var_rank: Optional[int] = None
    """"mamba" preset variance rank (default ceil(D/8))."""
    scan_backend: str = "auto"
    """kla_scan backend ("auto": Triton on CUDA, torch otherwise)."""
    recompute_scan: bool = False
    """Recompute only the KLA scan in backward."""
    ssm_lr_mult: float = 0.1
    """LR multiplier for A_log, Δ_raw, p (the optimizer reads `param.lr_mult`)."""
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
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {PRESETS}, got {self.preset!r}")
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
        self.mixer_config().validate(self.hidden_size)

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_yaml(cls, path: Union[str, Path]) -> "KLAModelConfig":
        from kla_megatron.yaml_io import parse_yaml

        data = parse_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of model config keys at the top level")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown model config keys {unknown}; known keys: {sorted(known)}")
        data.setdefault("name", Path(path).stem)
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    # ------------------------------------------------------------------ derived

    @property
    def d_inner(self) -> int:
        return int(self.expand * self.hidden_size)

    def mixer_config(self) -> KLAMixerConfig:
        return KLAMixerConfig(
            num_heads=self.kla_heads, d_state=self.d_state, expand=self.expand, conv_kernel=self.conv_kernel,
            preset=self.preset, var_rank=self.kla_var_rank, scan_backend=self.scan_backend,
            recompute_scan=self.recompute_scan, ssm_lr_mult=self.ssm_lr_mult,
        )

    def to_transformer_config(self, **overrides):
        """A megatron ``TransformerConfig`` for this architecture; ``overrides`` set parallelism
        and precision (tensor_model_parallel_size, sequence_parallel, pipeline_model_parallel_size,
        bf16, params_dtype, recompute_granularity, ...). CPU-safe defaults without CUDA."""
        from megatron.core.transformer import TransformerConfig

        tp = overrides.get("tensor_model_parallel_size", 1)
        self.mixer_config().validate(self.hidden_size, tp)
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


def load_model_config(name_or_path: Union[str, Path]) -> KLAModelConfig:
    """``"kla_125m"`` → ``configs/models/kla_125m.yaml``; a path is loaded as is."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = CONFIG_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        available = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no model config {str(name_or_path)!r}; available: {available}")
    return KLAModelConfig.from_yaml(path)

