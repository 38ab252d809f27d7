"""Model configs: bad settings fail at construction naming the fix; every named YAML
config loads and has its nominal size (the formula itself is checked against instantiated
models in test_model_features.py); FLOPs per token count KLA layers."""
import pytest

from kla_megatron.models import KLAModelConfig, flops_per_token, load_model_config, num_parameters
from kla_megatron.models.flops import SCAN_FLOPS_PER_ELEMENT

BASE = dict(vocab_size=64, hidden_size=16, num_layers=4, layer_pattern="K-K-", kla_heads=2, d_state=4,
            num_attention_heads=4)

# name -> (low, high) parameters
NOMINAL = {
    "kla_tiny": (1e5, 1e6),
    "kla_125m": (110e6, 145e6),
    "kla_350m": (320e6, 400e6),
    "kla_760m": (700e6, 820e6),
    "kla_1_3b": (1.2e9, 1.45e9),
    "kla_2_7b": (2.5e9, 2.9e9),
    "kla_7b": (6.5e9, 7.3e9),
    "hybrid_1_3b": (1.2e9, 1.45e9),
}


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(layer_pattern="K-X-"), r"unknown symbols \['X'\]"),
        (dict(layer_pattern="K-K"), r"make num_layers equal len\(layer_pattern\)"),
        (dict(kla_heads=3), r"choose kla_heads dividing 32"),
        (dict(preset="fancy"), r"preset must be one of"),
        (dict(preset="mamba", kla_var_rank=3), r"set kla_var_rank"),
    ],
)
def test_bad_config_fails_with_fix(change, match):
    with pytest.raises(ValueError, match=match):
        KLAModelConfig(**{**BASE, **change})


def test_heads_not_divisible_by_tp_fails_before_building():
    cfg = KLAModelConfig(**BASE)
    with pytest.raises(ValueError, match=r"set kla_heads to a multiple of 4"):
        cfg.to_transformer_config(tensor_model_parallel_size=4)


def test_unknown_yaml_key_is_rejected(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("vocab_size: 8\nhidden_size: 16\nnum_layers: 2\nhidden_sise: 3\n")
    with pytest.raises(ValueError, match="hidden_sise"):
        KLAModelConfig.from_yaml(path)


@pytest.mark.parametrize("name", list(NOMINAL))
def test_named_config_has_nominal_size(name):
    cfg = load_model_config(name)
    assert cfg.name == name and len(cfg.layer_pattern) == cfg.num_layers
    low, high = NOMINAL[name]
    assert low <= num_parameters(cfg) <= high, f"{name}: {num_parameters(cfg) / 1e6:.1f}M"


def test_hybrid_config_has_one_attention_layer_in_eight():
    cfg = load_model_config("hybrid_1_3b")
    assert cfg.layer_pattern.count("*") * 8 == cfg.num_layers


def test_flops_count_the_scan_and_attention():
    kla = KLAModelConfig(**BASE)
    no_scan = 3 * SCAN_FLOPS_PER_ELEMENT * kla.d_inner * kla.d_state * kla.layer_pattern.count("K")
    # KLA cost is independent of sequence length; attention's grows with it.
    assert flops_per_token(kla, 128) == flops_per_token(kla, 4096) > no_scan
    hybrid = KLAModelConfig(**{**BASE, "layer_pattern": "K*K-"})
    assert flops_per_token(hybrid, 4096) - flops_per_token(hybrid, 128) == 3 * 4 * (4096 - 128) * 16
