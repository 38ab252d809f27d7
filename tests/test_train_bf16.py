"""bf16, the default precision, trained end to end on CPU through the real trainer: the README's
main job (configs/tiny_cpu.yaml on the sample corpus) with ``train.precision=bf16`` next to the
same job in fp32, from the same seed.

The bf16 run goes through megatron's Float16Module with bf16 parameters, except the KLA SSM
parameters (A_log, Δ, p, λ_skip), which stay fp32; the distributed optimizer keeps fp32 main
weights for the bf16 parameters, in parameter groups split by dtype, and copies them back
rounded to bf16 after every step.
"""
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_on_ranks
from tests.train_capture import run_capturing

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
FP32_PARAMS = ("A_log", "delta_raw", "p", "lambda_skip")  # kept fp32 by the KLA mixer


def _argv(sample, precision):
    sets = ["checkpoint.dir=null", f"data.blend=[{sample['data_prefix']}]",
            f"data.tokenizer={sample['tokenizer_model']}",
            f"train.steps={STEPS}", "train.warmup_steps=1", "train.eval_interval=0", "train.deterministic=true",
            "logging.interval=100", f"train.precision={precision}"]
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), *(a for s in sets for a in ("--set", s))]


def _optimizer_state(engine) -> dict:
    """What the optimizer trains: its main parameters' dtypes, and for every bf16 model parameter
    its fp32 main copy (one rank, so each shard is a whole parameter)."""
    from kla_megatron.training.megatron_engine import _inner_optimizers

    main_dtypes, pairs, group_dtypes = set(), [], set()
    for o in _inner_optimizers(engine.optimizer):
        for group in o.optimizer.param_groups:
            main_dtypes |= {p.dtype for p in group["params"]}
        for models, mains in zip(o.model_float16_groups, o.shard_fp32_from_float16_groups):
            group_dtypes |= {p.dtype for p in models}
            pairs += [(m.detach().clone(), s.detach().clone()) for m, s in zip(models, mains)]
        for models in o.model_fp32_groups:
            group_dtypes |= {p.dtype for p in models}
    return {"main_dtypes": main_dtypes, "pairs": pairs, "group_dtypes": group_dtypes}


def _capture(trainer):
    e = trainer.engine
    return {"wrapper": type(e.chunks[0].module).__name__,
            "params": {n: p.detach().clone() for n, p in e.raw_chunks[0].named_parameters()}, **_optimizer_state(e)}


def _train(rank, world, runs):
    return [{"losses": dict(h.losses), "grad_norms": dict(h.grad_norms), **captured}
            for h, captured in run_capturing(runs, _capture)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from data_tools.prepare_sample import prepare_sample

    sample = prepare_sample(str(tmp_path_factory.mktemp("data")), vocab_size=512)
    fp32, bf16 = run_on_ranks(_train, world_size=1, args=([_argv(sample, "fp32"), _argv(sample, "bf16")],))[0]
    return fp32, bf16


def test_bf16_model_and_fp32_main_weights(runs):
    fp32, bf16 = runs
    assert bf16["wrapper"] == "Float16Module" and fp32["wrapper"] != "Float16Module"
    for name, p in bf16["params"].items():
        expected = torch.float32 if name.rsplit(".", 1)[-1] in FP32_PARAMS else torch.bfloat16
        assert p.dtype == expected, name
    assert {p.dtype for p in fp32["params"].values()} == {torch.float32}
    # mixed-dtype parameter groups: bf16 and fp32 model parameters, fp32 main weights for all
    assert bf16["group_dtypes"] == {torch.bfloat16, torch.float32}
    assert bf16["main_dtypes"] == {torch.float32}
    assert len(bf16["pairs"]) == sum(p.dtype == torch.bfloat16 for p in bf16["params"].values())
    fine = total = 0
    for model, main in bf16["pairs"]:
        assert main.dtype == torch.float32 and model.dtype == torch.bfloat16
        # the model holds the main weights rounded to bf16 (copied back after the last step) ...
        assert torch.equal(model.reshape(-1), main.reshape(-1).to(torch.bfloat16))
        # ... and the main weights hold what bf16 cannot: 5 steps of updates below bf16's spacing
        fine += int((main != main.to(torch.bfloat16).float()).sum())
        total += main.numel()
    assert fine > 0.9 * total, (fine, total)


def test_bf16_loss_curve_follows_fp32(runs):
    fp32, bf16 = runs
    assert sorted(bf16["losses"]) == sorted(fp32["losses"]) == list(range(1, STEPS + 1))
    # The bf16 rounding scale, measured on this run's weights: the largest relative error of
    # rounding the fp32 run's final weights to bf16 (8 significant bits: at most 2^-8 = 3.9e-3).
    weights = torch.cat([p.reshape(-1) for p in fp32["params"].values()])
    weights = weights[weights != 0]
    u = float(((weights.to(torch.bfloat16).float() - weights).abs() / weights.abs()).max())
    assert 2.0 ** -9 < u <= 2.0 ** -8
    # Tolerances: 2u relative on the loss (~7.8e-3, ~0.048 here): the forward rounds each matmul's
    # weights and input once; 4u on the grad norm: the backward rounds the weights, the saved
    # activations and the incoming gradient again. Seen: 8.7e-5 at most on the loss, 2.5e-3 on the
    # grad norm (steps 1-5).
    for step in range(1, STEPS + 1):
        assert bf16["losses"][step] == pytest.approx(fp32["losses"][step], rel=2 * u), step
        assert bf16["grad_norms"][step] == pytest.approx(fp32["grad_norms"][step], rel=4 * u), step
    # both runs learn, by several times the tolerance: the comparison is not between flat curves
    for r in (fp32, bf16):
        assert r["losses"][1] - r["losses"][STEPS] > 5 * (2 * u) * r["losses"][1], r["losses"]
