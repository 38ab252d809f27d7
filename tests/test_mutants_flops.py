"""models/flops.py's counts on a small hand-made config, every term worked out by hand from the
formulas in that module's docstring: D = 8, d_inner = 16, 2 KLA heads (P = 8), d_state 4, conv
kernel 4, 2 attention heads (head_dim 4), ffn 12, vocab 10. Written against bench/mutation.sh's
surviving mutants; the check against instantiated models is tests/test_model_features.py."""
from types import SimpleNamespace

import pytest

from kla_megatron.models.flops import SCAN_FLOPS_PER_ELEMENT, flops_per_token, forward_flops_per_token, \
    layer_parameters, num_parameters


def _cfg(**kw):
    mixer = SimpleNamespace(num_heads=2, preset="plain", d_state=4, conv_kernel=4,
                            resolved_var_rank=lambda hidden: {8: 6}[hidden])
    base = dict(hidden_size=8, d_inner=16, mixer=mixer, normalization="RMSNorm", num_attention_heads=2,
                num_query_groups=1, ffn_hidden_size=12, swiglu=True, vocab_size=10, tie_embeddings=False,
                layer_pattern="K*-")
    return SimpleNamespace(**{**base, **kw})


def test_kla_layer_parameters():
    # norm 8 + in/out projections 2*16*8 + 16*8 + sensors 16 * (2P + 2S = 24)
    # + conv 16 * (4 + 1) + A_log, Δ, p 3 * 16 * 4 + 1
    assert layer_parameters(_cfg(), "K") == 8 + 256 + 128 + 384 + 80 + 192 + 1
    mamba = _cfg()
    mamba.mixer.preset = "mamba"  # sensors: 2 * (rank 6 / 2 heads) + 2S = 14
    assert layer_parameters(mamba, "K") == 8 + 256 + 128 + 16 * 14 + 80 + 192 + 1


def test_attention_and_mlp_layer_parameters():
    assert layer_parameters(_cfg(), "*") == 8 + 8 * (8 + 2 * 4) + 8 * 8  # one KV group of head_dim 4
    assert layer_parameters(_cfg(num_query_groups=None), "*") == 8 + 8 * (8 + 2 * 8) + 8 * 8  # MHA
    assert layer_parameters(_cfg(), "-") == 8 + 8 * 12 * 3
    assert layer_parameters(_cfg(swiglu=False), "-") == 8 + 8 * 12 * 2
    assert layer_parameters(_cfg(normalization="LayerNorm"), "-") == 16 + 8 * 12 * 3  # weight and bias


def test_unknown_layer_symbol_is_refused():
    with pytest.raises(ValueError, match="unknown layer symbol 'X'"):
        layer_parameters(_cfg(), "X")


def test_num_parameters_adds_embedding_head_final_norm_and_layers():
    layers = 1049 + 200 + 296
    assert num_parameters(_cfg()) == 80 + 80 + 8 + layers
    assert num_parameters(_cfg(tie_embeddings=True)) == 80 + 8 + layers


@pytest.mark.parametrize("preset", ["plain", "mamba"])
def test_counts_are_integers(preset):
    cfg = _cfg()
    cfg.mixer.preset = preset
    assert all(type(n) is int for n in (num_parameters(cfg), flops_per_token(cfg, 32)))


def test_forward_and_training_flops():
    assert SCAN_FLOPS_PER_ELEMENT == 15  # 9 for the information-form update + 6 for the read-out
    kla = 2 * 768 + 2 * 16 * 4 + 15 * 16 * 4
    attention = 2 * 192 + 4 * 32 * 8  # projections + scores and values over the full sequence
    mlp = 2 * 288
    logits = 2 * 8 * 10
    assert forward_flops_per_token(_cfg(), 32) == kla + attention + mlp + logits
    assert flops_per_token(_cfg(), 32) == 3 * (kla + attention + mlp + logits)
    assert forward_flops_per_token(_cfg(layer_pattern="KK"), 32) == 2 * kla + logits
