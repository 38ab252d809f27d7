"""Model configs: bad settings fail at construction naming the fix; every named YAML
config loads and has its nominal size (the formula itself is checked against instantiated
models in test_model_features.py); FLOPs per token count KLA layers."""
import pytest
import torch

from kla_megatron.models import KLAModelConfig, flops_per_token, load_model_config, num_parameters
from kla_megatron.models.flops import SCAN_FLOPS_PER_ELEMENT
from tests import test_model_helpers as h
from tests.dist_utils import run_on_ranks

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
        KLAModelConfig.from_dict({**BASE, **change})


def test_heads_not_divisible_by_tp_fails_before_building():
    cfg = KLAModelConfig.from_dict(BASE)
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


def _lane_ops(v, lambda_v, k, q, a, p):
    """Arithmetic the float64 reference scan executes per (token, lane), counted op by op."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from kla_megatron.ops.kla.naive import naive_kla_scan

    lanes = v.shape[0] * v.shape[2] * v.shape[3] * k.shape[-1]
    arith = {"aten.mul.Tensor", "aten.add.Tensor", "aten.div.Tensor", "aten.reciprocal.default"}

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if name == "aten.mul.Tensor" and not isinstance(args[1], torch.Tensor) and args[1] == 1.0:
                return out  # ``1.0 / λ`` dispatches as reciprocal then × 1.0: one operation
            if name in arith and out.numel() == lanes:
                Count.total += lanes
            elif name == "aten.sum.dim_IntList" and args[0].numel() == lanes:
                Count.total += lanes  # Σ_s: one add per lane (a multiply-add counts 2)
            return out

    with Count():
        naive_kla_scan(v, lambda_v, k, q, a, p)
    return Count.total / (v.shape[1] * lanes)


def test_scan_flops_per_lane_from_the_information_form():
    """The scan term: FLOPs per (token, channel m, state s) lane of the information-form step
    (``kla_megatron/ops/kla/naive.py``), with ā² precomputed (time-invariant, like the kernels):

        φ = Λv·k²                  1 mul   (k² is per (t, s), shared by the channels)
        r = (v·Λv)·k               1 mul   (v·Λv is per (t, m), shared by the states)
        d = ā² + p̄·λ               1 mul + 1 add
        λ⁻ = λ/d,  α = ā/d         2 div
        λ = λ⁻ + φ                 1 add
        η = α·η + r                1 mul + 1 add
        μ = η/λ,  σ = 1/λ          1 div + 1 reciprocal
        y = Σ_s q·μ                1 mul + 1 add
        yvar = Σ_s q²·σ            1 mul + 1 add   (q² shared by the channels)
                                   ------------------
                                   15 forward FLOPs per lane per token

    The count is checked by counting, op by op, what the reference executes on shapes where
    B, H, P, S differ (so per-lane ops are told apart from shared ones). Training counts the
    backward as 2 × forward (the MFU convention), so training = 3 × forward.
    """
    from kla_megatron.models.flops import forward_flops_per_token

    gen = torch.Generator().manual_seed(0)
    B, T, H, P, S = 2, 3, 5, 3, 7
    f64 = dict(generator=gen, dtype=torch.float64)
    v, lambda_v = torch.randn(B, T, H, P, **f64), torch.rand(B, T, H, P, **f64) + 0.1
    k, q = torch.randn(B, T, H, S, **f64), torch.randn(B, T, H, S, **f64)
    a, p = torch.rand(H, P, S, **f64), torch.rand(H, P, S, **f64)
    assert _lane_ops(v, lambda_v, k, q, a, p) == 15 == SCAN_FLOPS_PER_ELEMENT
    kla = KLAModelConfig.from_dict(BASE)
    assert flops_per_token(kla, 128) == 3 * forward_flops_per_token(kla, 128)


def _measured_forward_flops(cfg, batch, seq):
    """(matmul + conv FLOPs per token from FlopCounterMode, matmul FLOPs of the backward)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = h.build(cfg, dtype=torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    # The math backend spells attention as matmuls the counter sees (full L×L, like the formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        logits = model(tokens, None, None)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as bwd:
        logits.float().square().mean().backward()
    # The causal depthwise conv is a custom op the counter does not see: count F.conv1d on
    # the layer's own weight instead (channels and kernel read from the parameters).
    conv = 0
    for layer in model.decoder.layers:
        mixer = getattr(layer, "mixer", None)
        if mixer is not None:
            weight = mixer.conv_weight.detach().reshape(mixer.conv_weight.shape[0], 1, -1)
            x = torch.zeros(batch, weight.shape[0], seq + weight.shape[-1] - 1)  # left-padded: seq outputs
            with FlopCounterMode(display=False) as counter:
                torch.nn.functional.conv1d(x, weight, groups=x.shape[1])
            conv += counter.get_total_flops()
    tokens_n = batch * seq
    return (fwd.get_total_flops() + conv) / tokens_n, bwd.get_total_flops() / tokens_n, fwd.get_total_flops() / tokens_n


FLOP_CASES = {
    "plain_hybrid": ("K*K-", "plain", {}),
    "mamba": ("K-", "mamba", {}),
    "gqa_gelu": ("K*-", "plain", dict(num_query_groups=2, swiglu=False, ffn_hidden_size=48, d_state=3)),
}


def _flop_body(rank, world_size):
    h.setup_parallel(1, 1)
    out = {}
    for name, (pattern, preset, extra) in FLOP_CASES.items():
        cfg = h.tiny_config(pattern, preset, **extra)
        out[name] = (cfg, _measured_forward_flops(cfg, batch=2, seq=h.SEQ))
    return out


@pytest.fixture(scope="module")
def measured_flops():
    return run_on_ranks(_flop_body, world_size=1)[0]


@pytest.mark.parametrize("case", list(FLOP_CASES))
def test_flops_match_flop_counter_on_the_model(measured_flops, case):
    """forward_flops_per_token = FlopCounterMode's matmuls and conv on a real forward + the
    scan term (15 per lane, derived above); the matmul backward is exactly 2 × its forward."""
    from kla_megatron.models.flops import forward_flops_per_token

    cfg, (forward, backward_matmul, forward_matmul) = measured_flops[case]
    scan = 15 * cfg.d_inner * cfg.mixer.d_state * cfg.layer_pattern.count("K")
    assert forward_flops_per_token(cfg, h.SEQ) == forward + scan
    assert backward_matmul == 2 * forward_matmul


def test_flops_count_the_scan_and_attention():
    kla = KLAModelConfig.from_dict(BASE)
    # KLA cost is independent of sequence length; attention's grows with it (4·L·D per token:
    # Q·Kᵀ and P·V, 2 FLOPs per multiply-add, forward; × 3 for training).
    assert flops_per_token(kla, 128) == flops_per_token(kla, 4096)
    hybrid = KLAModelConfig.from_dict({**BASE, "layer_pattern": "K*K-"})
    assert flops_per_token(hybrid, 4096) - flops_per_token(hybrid, 128) == 3 * 4 * (4096 - 128) * 16
