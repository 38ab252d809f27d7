"""Optimizer parameter groups on a real tiny model built by the trainer (CPU, one gloo rank):
every parameter sits in exactly one group of megatron's (distributed) optimizer, and the lr
multiplier and weight decay each parameter gets, by name, are the paper's rules:

- the SSM parameters A_log, Δ_raw, p: lr × ssm_lr_mult (0.1), no weight decay;
- λ_skip, the conv bias, norm weights, biases and the input embedding: no weight decay;
- every other weight (projections, sensor weights, conv kernel, output layer): lr, decay;
- recipe refinements (``train.embedding_lr``, ``train.ssm_group_extra``, ``train.decay_conv``)
  move exactly the parameters they name.
"""
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks

MODEL = "vocab_size: 64\nhidden_size: 16\nnum_layers: 3\nlayer_pattern: K*-\nkla_heads: 2\nd_state: 4\n" \
        "num_attention_heads: 4\nmax_seq_len: 32\npreset: {preset}\nkla_var_rank: 4\n"
CASES = {
    "default": ("plain", []),
    "mamba_bf16": ("mamba", ["train.precision=bf16"]),
    "recipe": ("plain", ["train.embedding_lr=6.0e-3", "train.ssm_group_extra=[lambda_skip]", "train.decay_conv=false"]),
}
STEP = 3


def expected(name: str, case: str) -> tuple[float, float]:
    """(lr multiplier, weight-decay multiplier) of a parameter, from the rules in the docstring."""
    leaf = name.rsplit(".", 1)[-1]
    recipe = case == "recipe"
    ssm = leaf in ("A_log", "delta_raw", "p") or (recipe and leaf == "lambda_skip")
    embedding = "word_embeddings" in name
    no_decay = (ssm or embedding or "norm" in name or leaf in ("bias", "lambda_skip", "conv_bias")
                or (recipe and leaf == "conv_weight"))
    lr = 0.1 if ssm else (2.0 if recipe and embedding else 1.0)  # embedding_lr 6e-3 = 2 × lr 3e-3
    return lr, 0.0 if no_decay else 1.0


def _groups(rank, world, tmp):
    """{case: (base lr at STEP, weight decay, {name: [(group lr, group weight decay, dtype), ...]})}."""
    from megatron.core import parallel_state

    from kla_megatron.training.config import load_run_config
    from kla_megatron.training.schedule import apply_lr, lr_at
    from kla_megatron.training.trainer import Trainer

    out = {}
    for case, (preset, overrides) in CASES.items():
        model = Path(tmp, f"{case}.yaml")
        model.write_text(MODEL.format(preset=preset))
        cfg = load_run_config("tiny_cpu", [f"model={model}", "data.kind=mock", f"checkpoint.dir={tmp}/{case}",
                                           "train.seq_length=16", *overrides])
        engine = Trainer(cfg).engine
        apply_lr(engine.optimizer.param_groups, cfg.train, STEP)
        where = {}
        optimizers = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
        for chunk in engine.raw_chunks:
            for name, param in chunk.named_parameters():
                for opt in optimizers:
                    if param in opt.model_param_group_index_map:
                        group = opt.optimizer.param_groups[opt.model_param_group_index_map[param][0]]
                        where.setdefault(name, []).append((group["lr"], group["weight_decay"], param.dtype))
        sizes = sum(len(g["params"]) for opt in optimizers for g in opt.optimizer.param_groups)
        n_params = sum(1 for chunk in engine.raw_chunks for _ in chunk.parameters())
        out[case] = (lr_at(cfg.train, STEP), cfg.train.weight_decay, where, sizes, n_params)
        parallel_state.destroy_model_parallel()
    return out


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return run_on_ranks(_groups, world_size=1, args=(str(tmp_path_factory.mktemp("groups")),))[0]


@pytest.mark.parametrize("case", list(CASES))
def test_every_parameter_in_exactly_one_group(groups, case):
    _, _, where, sizes, n_params = groups[case]
    assert len(where) == n_params == sizes
    assert {n: len(g) for n, g in where.items() if len(g) != 1} == {}


@pytest.mark.parametrize("case", list(CASES))
def test_each_parameter_gets_its_lr_and_weight_decay(groups, case):
    import torch

    base_lr, wd, where, _, _ = groups[case]
    got = {name: (lr, decay) for name, [(lr, decay, _)] in where.items()}
    want = {name: (base_lr * lr_mult, wd * wd_mult) for name in where for lr_mult, wd_mult in [expected(name, case)]}
    assert got == pytest.approx(want, rel=1e-12), {n: (got[n], want[n]) for n in got if got[n] != pytest.approx(want[n])}
    leaves = {name.rsplit(".", 1)[-1] for name in where}
    assert {"A_log", "delta_raw", "p", "lambda_skip", "conv_weight", "conv_bias", "weight"} <= leaves, leaves
    if case == "mamba_bf16":  # the SSM parameters stay fp32 in a bf16 model, the linears are bf16
        dtypes = {name: dtype for name, [(_, _, dtype)] in where.items()}
        ssm = {n: d for n, d in dtypes.items() if n.endswith((".A_log", ".delta_raw", ".p"))}
        assert ssm and set(ssm.values()) == {torch.float32}, ssm
        assert dtypes["decoder.layers.0.mixer.in_proj.weight"] == torch.bfloat16, dtypes
