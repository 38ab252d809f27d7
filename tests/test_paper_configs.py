"""The paper's FineWeb-Edu language-model runs as configs: the 45M and 180M KLA models and the
same-size hybrids (configs/models/paper_*.yaml) with their recipes (configs/paper_*.yaml).

Checked: the architecture and recipe values (learning rates from the paper's scaling rule),
the parameter counts, which learning rate and weight decay each parameter gets from the real
megatron optimizer (by parameter name), the schedule's shape, and ``kla-pretrain --dry-run``.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from kla_megatron.models.config import load_model_config
from kla_megatron.models.flops import num_parameters
from kla_megatron.training.config import load_run_config
from kla_megatron.training.schedule import lr_at

REPO = Path(__file__).resolve().parents[1]
# name: (d_model, global batch in tokens, nominal size)
RUNS = {
    "paper_kla_45m": (496, 131_072, 45e6),
    "paper_kla_180m": (1360, 524_288, 180e6),
    "paper_hybrid_45m": (496, 131_072, 45e6),
    "paper_hybrid_180m": (1360, 524_288, 180e6),
}
SSM_GROUP = {"A_log", "delta_raw", "p", "lambda_skip"}  # the paper's (A, Δ, q, λ)


def _recipe(name, *overrides):
    return load_run_config(str(REPO / "configs" / f"{name}.yaml"), list(overrides))


def scaled(base: float, d_model: int, batch_tokens: int) -> float:
    """The paper's rule: base · √(768/d_model) · √(B/2¹⁹)."""
    return base * math.sqrt(768 / d_model) * math.sqrt(batch_tokens / 2**19)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_architecture(name):
    d_model = RUNS[name][0]
    cfg = load_model_config(name)
    assert (cfg.hidden_size, cfg.vocab_size, cfg.max_seq_len) == (d_model, 32768, 2048)
    mixer = cfg.mixer
    assert (mixer.d_state, mixer.conv_kernel, mixer.expand, mixer.preset, mixer.num_heads) == (32, 4, 2.0, "mamba", 1)
    assert not cfg.tie_embeddings
    blocks = [cfg.layer_pattern[i:i + 2] for i in range(0, len(cfg.layer_pattern), 2)]
    assert len(blocks) == 12
    assert blocks == (["K-"] * 12 if "kla" in name else ["*-"] * 11 + ["K-"])  # hybrid: last attention → KLA
    assert (mixer.p_init, mixer.dt_min, mixer.dt_max, mixer.ssm_lr_mult) == (0.01, 1e-3, 1e-1, 0.1)


@pytest.mark.parametrize("name", sorted(RUNS))
def test_recipe_values(name):
    d_model, batch_tokens, _ = RUNS[name]
    run = _recipe(name)
    t = run.train
    assert run.model.name == name and t.seq_length == 2048
    assert t.global_batch_size * t.seq_length == batch_tokens
    assert t.lr == pytest.approx(scaled(4e-3, d_model, batch_tokens), rel=1e-4)
    assert t.embedding_lr == pytest.approx(scaled(0.3, d_model, batch_tokens), rel=1e-4)
    assert round(t.lr, 4) == {496: 2.5e-3, 1360: 3.0e-3}[d_model]  # the paper's effective peaks
    assert (t.adam_beta1, t.adam_beta2, t.adam_eps) == (0.8, 0.95, 1e-10)
    assert (t.weight_decay, t.clip_grad, t.precision) == (0.1, 3.0, "fp32")
    assert (t.lr_schedule, t.wsd_decay_style, t.warmup_steps, t.decay_fraction, t.min_lr) == ("wsd", "linear", 0, 0.4, 0.0)
    assert t.ssm_group_extra == ["lambda_skip"] and t.decay_conv is False


def _non_embedding(cfg) -> int:
    return num_parameters(cfg) - cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_embeddings else 2)


def test_kla_45m_lands_near_45m():
    """Non-embedding parameters (embedding and untied output layer excluded) within 1 % of 45M."""
    n = _non_embedding(load_model_config("paper_kla_45m"))
    assert abs(n - 45e6) / 45e6 < 0.01, n


@pytest.mark.xfail(strict=True, reason=(
    "the layout described for the paper's models (12 blocks of KLA/attention + SwiGLU MLP, mamba "
    "preset, untied) gives 327.2M non-embedding / 416.3M total at d_model 1360, and the 45M hybrid "
    "36.2M / 68.7M; which count the paper's 180M uses, or which layout, is not settled"))
@pytest.mark.parametrize("name", ["paper_kla_180m", "paper_hybrid_45m", "paper_hybrid_180m"])
def test_other_sizes_land_near_their_nominal_size(name):
    nominal = RUNS[name][2]
    n = _non_embedding(load_model_config(name))
    assert abs(n - nominal) / nominal < 0.05, n


def _expected(name: str, ndim: int, t) -> tuple[float, float]:
    """(lr, weight decay) at step 0 of a paper recipe, written from the recipe's text."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in SSM_GROUP:
        return 0.1 * t.lr, 0.0
    if "word_embeddings" in name:
        return t.embedding_lr, 0.0
    if ndim == 1 or leaf in ("conv_weight", "conv_bias"):  # norms, biases, the conv filter
        return t.lr, 0.0
    return t.lr, t.weight_decay  # 2-D hidden and head weights (per-head sensor blocks are [H, ., .])


def _groups_body(rank, world_size, names):
    import kla_megatron
    from kla_megatron.training.megatron_engine import MegatronEngine
    from kla_megatron.training.model_factory import model_config as run_model_config
    from kla_megatron.training.schedule import apply_lr

    kla_megatron.init_parallel()
    out = {}
    for name in names:
        # Without the distributed optimizer the fp32 optimizer holds the model's own parameters,
        # so each group's parameters can be named; the groups come from the same overrides.
        run = _recipe(name, "use_distributed_optimizer=false", "data.kind=mock")
        engine = MegatronEngine(run, run_model_config(run), 0)
        apply_lr(engine.optimizer.param_groups, run.train, 0)
        ids = {id(p): (n, p.ndim, p.numel()) for c in engine.raw_chunks for n, p in c.named_parameters()}
        got = {}
        for g in engine.optimizer.param_groups:
            for p in g["params"]:
                n, ndim, numel = ids[id(p)]
                got[n] = (g["lr"], g["weight_decay"], ndim, numel)
        # The DeepSpeed engine's plain torch groups, from the same policy.
        from kla_megatron.training.param_groups import GroupPolicy, torch_param_groups

        groups = torch_param_groups(engine.raw_chunks[0], GroupPolicy.from_config(run.train, run_model_config(run)))
        apply_lr(groups, run.train, 0)
        plain = {ids[id(p)][0]: (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
        out[name] = got
        out[name + ":torch"] = plain
    return out


@pytest.fixture(scope="module")
def optimizer_groups():
    return run_on_ranks(_groups_body, world_size=1, args=(["paper_kla_45m", "paper_hybrid_45m"],))[0]


@pytest.mark.parametrize("name", ["paper_kla_45m", "paper_hybrid_45m"])
def test_each_parameter_gets_its_lr_and_weight_decay(optimizer_groups, name):
    got, t = optimizer_groups[name], _recipe(name).train
    wrong = {}
    for n, (lr, wd, ndim, _) in got.items():
        want_lr, want_wd = _expected(n, ndim, t)
        if not (math.isclose(lr, want_lr, rel_tol=1e-6) and wd == want_wd):
            wrong[n] = (lr, wd, want_lr, want_wd)
    assert not wrong, wrong
    decayed = {n for n, (_, wd, _, _) in got.items() if wd}
    for part in ("output_layer.weight", "in_proj.weight", "out_proj.weight", "sensor_weight", "linear_fc1.weight"):
        assert any(part in n for n in decayed), part
    if "hybrid" in name:
        assert any("linear_qkv" in n for n in decayed)
    assert sum(n.endswith("lambda_skip") for n in got) == (12 if "kla" in name else 1)


@pytest.mark.parametrize("name", ["paper_kla_45m", "paper_hybrid_45m"])
def test_deepspeed_groups_agree_with_megatron(optimizer_groups, name):
    megatron, plain = optimizer_groups[name], optimizer_groups[name + ":torch"]
    assert set(plain) == set(megatron)
    assert {n: lr for n, (lr, _) in plain.items()} == pytest.approx({n: v[0] for n, v in megatron.items()}, rel=1e-6)
    assert {n: wd for n, (_, wd) in plain.items()} == {n: v[1] for n, v in megatron.items()}


def test_counts_formula_matches_the_built_model(optimizer_groups):
    for name, got in optimizer_groups.items():
        if name.endswith(":torch"):
            continue
        assert sum(numel for *_, numel in got.values()) == num_parameters(load_model_config(name)), name


@pytest.mark.parametrize("name", ["paper_kla_45m", "paper_kla_180m"])
def test_schedule_is_constant_then_linear_to_zero_over_the_last_40_percent(name):
    t = _recipe(name).train
    lrs = [lr_at(t, s) for s in range(t.steps)]
    start = t.steps - round(0.4 * t.steps)
    assert lrs[:start] == [t.lr] * start  # no warm-up, constant
    decay = lrs[start:]
    steps = range(1, len(decay) + 1)
    assert decay == pytest.approx([t.lr * (1 - i / len(decay)) for i in steps], rel=1e-9, abs=1e-15)
    assert decay[-1] == 0.0 and all(a > b for a, b in zip(decay, decay[1:]))


@pytest.mark.parametrize("name", sorted(RUNS))
def test_dry_run_passes(name, capsys):
    from kla_megatron.train import run

    assert run(["--config", str(REPO / "configs" / f"{name}.yaml"), "--dry-run"]) is None
    assert f"model:\n  name: {name}\n" in capsys.readouterr().out  # the resolved model config


def test_console_script_dry_run():
    proc = subprocess.run([sys.executable, "-m", "kla_megatron.train", "--config", "configs/paper_kla_180m.yaml",
                           "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "embedding_lr: 0.22544" in proc.stdout


@pytest.mark.parametrize("override, message", [
    ("train.decay_fraction=1.5", "train.decay_fraction must be in (0, 1]"),
    ("train.decay_steps=10", "train.decay_fraction and train.decay_steps both set"),
    ("train.embedding_lr=0", "train.embedding_lr must be > 0"),
    ("train.ssm_group_extra=[decoder.lambda_skip]", "train.ssm_group_extra must be a list of parameter names"),
])
def test_bad_recipe_keys_are_one_line_errors(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        _recipe("paper_kla_45m", override)


def test_default_policy_changes_nothing():
    """Runs without the new keys keep the model's own marks (backward compatible)."""
    import torch

    from kla_megatron.training.param_groups import GroupPolicy, group_multipliers

    cfg = load_run_config(str(REPO / "configs" / "tiny_cpu.yaml"))
    policy = GroupPolicy.from_config(cfg.train, load_model_config("kla_tiny"))
    params = {"decoder.layers.0.mixer.conv_weight": torch.nn.Parameter(torch.zeros(4, 1, 4)),
              "decoder.layers.0.mixer.lambda_skip": torch.nn.Parameter(torch.zeros(())),
              "embedding.word_embeddings.weight": torch.nn.Parameter(torch.zeros(8, 4)),
              "output_layer.weight": torch.nn.Parameter(torch.zeros(8, 4))}
    for n, p in params.items():
        assert group_multipliers(n, p, policy) == group_multipliers(n, p), n
