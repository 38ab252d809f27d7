"""Parity with the paper's reference ``kla`` v0.1.0 (golden vectors in tests/golden, see its README.md).

With H = 1 and the reference's weights (mapped by ``kla_megatron.models.reference_names``)
our mixer reproduces y, y_var and the final filter state of both presets, and our model with
pattern ``K-K-`` (SwiGLU MLP, RMSNorm, untied) reproduces the reference ``SequenceModel``
logits. We run in float64 throughout; the reference, although run "in float64", casts the
sensors, Δ/A/p and the whole scan to float32 (``.float()`` in its ``_project_sensors`` and
``_compute_aq``), so agreement is bounded by float32 round-off: we require a max error
below 2e-6 of the reference's scale (a wrong formula is off by 1e-2 or more).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.dist_utils import run_on_ranks

GOLDEN = Path(__file__).resolve().parent / "golden"


def _load(case):
    data = np.load(GOLDEN / f"kla_ref_{case}.npz")
    params = {k[len("param."):]: torch.from_numpy(np.array(data[k])) for k in data.files if k.startswith("param.")}
    arrays = {k: torch.from_numpy(np.array(data[k])) for k in data.files if not k.startswith("param.") and k != "meta"}
    return params, arrays, json.loads(str(data["meta"]))


def _init_megatron():
    from kla_megatron.compat import enable_cpu_megatron
    from megatron.core import parallel_state

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel()


def _assert_matches(ours, ref, bound=2e-6):
    assert ours.shape == ref.shape
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err < bound, f"max |ours - reference| / max |reference| = {err:.3e} (bound {bound})"


def _mixer_case(case):
    from kla_megatron.models import KLAModelConfig, KLARuntimeConfig
    from kla_megatron.models.kla_layer_specs import kla_layer_spec
    from kla_megatron.models.reference_names import mixer_from_reference
    from megatron.core.transformer.spec_utils import build_module

    params, arrays, meta = _load(case)
    preset = "mamba" if meta["config"].get("value_rank") == "conv" else "plain"
    cfg = KLAModelConfig.from_dict(dict(vocab_size=8, hidden_size=meta["d_model"], num_layers=1, layer_pattern="K",
                                        d_state=meta["config"]["d_state"], expand=meta["config"]["expand"],
                                        preset=preset, kla_heads=1, num_attention_heads=1))
    tc = cfg.to_transformer_config(params_dtype=torch.float64)
    mixer = build_module(kla_layer_spec(cfg.mixer, KLARuntimeConfig(scan_backend="torch")).submodules.mixer, tc)
    missing, unexpected = mixer.load_state_dict(mixer_from_reference(params), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)

    x = arrays["x"].transpose(0, 1).contiguous()  # [s, b, D]
    state = mixer.initial_inference_state(x.shape[1])
    with torch.no_grad():
        (out, bias), out_var = mixer(x, inference_state=state, return_variance=True)
    assert bias is None
    lam, eta = state.ssm  # [b, H=1, M, S]
    return {
        "y": (out.transpose(0, 1), arrays["y"]),
        "y_var": (out_var.transpose(0, 1), arrays["y_var"]),
        "final_lam": (lam[:, 0], arrays["final_lam"].double()),
        "final_eta": (eta[:, 0], arrays["final_eta"].double()),
    }


def _model_case():
    from kla_megatron.models import KLAModelConfig, KLARuntimeConfig, build_kla_model
    from kla_megatron.models.reference_names import model_from_reference

    params, arrays, meta = _load("model")
    mc, kc = meta["model_config"], meta["kla_config"]
    ffn = int(2 * int(mc["d_model"] * mc["mlp_ratio"]) / 3)  # the reference's SwiGLU width
    cfg = KLAModelConfig.from_dict(dict(
        vocab_size=mc["vocab_size"], hidden_size=mc["d_model"], num_layers=2 * mc["n_layers"],
        layer_pattern="K-" * mc["n_layers"], d_state=kc["d_state"], expand=kc["expand"], ffn_hidden_size=ffn,
        swiglu=True, normalization="RMSNorm", norm_eps=mc["norm_eps"], tie_embeddings=mc["tie_embeddings"],
        num_attention_heads=1))
    model = build_kla_model(cfg, cfg.to_transformer_config(params_dtype=torch.float64),
                            runtime=KLARuntimeConfig(scan_backend="torch"))
    missing, unexpected = model.load_state_dict(model_from_reference(params), strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    with torch.no_grad():
        logits = model(arrays["tokens"], None, None)
    return {"logits": (logits, arrays["logits"])}


def _golden_body(rank, world_size):
    _init_megatron()
    results = {}
    for case in ("plain", "mamba"):
        for name, (ours, ref) in _mixer_case(case).items():
            results[f"{case}.{name}"] = (ours.double(), ref.double())
    for name, (ours, ref) in _model_case().items():
        results[f"model.{name}"] = (ours.double(), ref.double())
    return results


@pytest.fixture(scope="module")
def golden_results():
    return run_on_ranks(_golden_body, world_size=1)[0]


@pytest.mark.parametrize("case", ["plain", "mamba"])
@pytest.mark.parametrize("quantity", ["y", "y_var"])
def test_mixer_outputs_match_reference(golden_results, case, quantity):
    _assert_matches(*golden_results[f"{case}.{quantity}"])


@pytest.mark.parametrize("case", ["plain", "mamba"])
@pytest.mark.parametrize("quantity", ["final_lam", "final_eta"])
def test_mixer_final_state_matches_reference(golden_results, case, quantity):
    _assert_matches(*golden_results[f"{case}.{quantity}"])


def test_model_logits_match_reference(golden_results):
    _assert_matches(*golden_results["model.logits"])
