"""The training job (``kla_megatron.train.run``, what ``kla-pretrain`` calls) under every parallel
layout on 2 gloo ranks trains like one process: TP=2 with sequence parallelism, PP=2 (1F1B),
PP=2 x VP=2 (interleaved 1F1B), CP=2 and DP=2, each against the single-process loss and
gradient-norm curves.

A hybrid tiny model (KLA and attention layers, untied output layer so the pipeline's last stage
owns its own head), fp32, deterministic, mock data, 4 steps with warmup and a cosine decay.
4 micro-batches per step so the pipelines run warmup, steady 1F1B and cooldown phases.

Every run starts from the same weights through ``checkpoint.init_from``: a seed alone gives
another initialisation under PP (each stage builds its layers from the same RNG stream, so the
second stage's layers are not the ones a single process draws after the first stage's).
"""
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

STEPS = 4
LAYOUTS = {  # name -> --set overrides, each on 2 ranks
    "tp2_sp": ("parallel.tensor=2", "parallel.sequence_parallel=true"),
    "pp2": ("parallel.pipeline=2",),
    "pp2_vp2": ("parallel.pipeline=2", "parallel.virtual_pipeline=2"),
    "cp2": ("parallel.context=2",),
    "dp2": (),
}


def _argv(model_yaml, *overrides):
    """The run with ``overrides`` (later --set win)."""
    sets = [f"model={model_yaml}", "checkpoint.dir=null", "data.kind=mock", "train.precision=fp32",
            "train.seq_length=32", "train.micro_batch_size=1", "train.global_batch_size=4",
            f"train.steps={STEPS}", "train.warmup_steps=1", "train.lr=1e-2", "train.min_lr=1e-3",
            "train.eval_interval=0", "train.deterministic=true", "logging.interval=100", *overrides]
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), *(a for s in sets for a in ("--set", s))]


def _train(rank, world, runs):
    from kla_megatron.train import run

    out = []
    for argv in runs:
        h = run(argv)
        out.append({"losses": dict(h.losses), "grad_norms": dict(h.grad_norms)})
    return out


@pytest.fixture(scope="module")
def curves(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    model_yaml = write_tiny_model(root / "hybrid.yaml", num_query_groups=2, tie_embeddings=False)
    # the initial weights: one step at lr 1e-12 leaves them where they started (Adam moves each by ~lr)
    init = _argv(model_yaml, f"checkpoint.dir={root / 'init'}", "train.steps=1", "train.warmup_steps=0",
                 "train.lr=1e-12", "train.min_lr=0", "train.weight_decay=0")
    start = f"checkpoint.init_from={root / 'init'}"
    _, single = run_on_ranks(_train, world_size=1, args=([init, _argv(model_yaml, start)],))[0]
    runs = run_on_ranks(_train, world_size=2, args=([_argv(model_yaml, start, *o) for o in LAYOUTS.values()],))
    return single, {name: [r[i] for r in runs] for i, name in enumerate(LAYOUTS)}


def test_single_process_run_learns(curves):
    single, _ = curves
    assert sorted(single["losses"]) == list(range(1, STEPS + 1))
    # the curves compared below move: each step's loss is well below the one before
    losses = [single["losses"][s] for s in range(1, STEPS + 1)]
    assert all(b < a - 0.05 for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(curves, layout):
    single, layouts = curves
    for rank, res in enumerate(layouts[layout]):
        assert sorted(res["losses"]) == list(range(1, STEPS + 1)), (layout, rank)
        for step in range(1, STEPS + 1):
            # fp32 round-off only: the layouts sum the same terms in another order (TP's split
            # matmuls and all-reduces, the DP/CP gradient all-reduce, CP's chunked scan and
            # attention), about 1e-7 relative per step, grown by 4 Adam steps at lr 1e-2.
            assert res["losses"][step] == pytest.approx(single["losses"][step], rel=1e-5), (layout, rank, step)
            assert res["grad_norms"][step] == pytest.approx(single["grad_norms"][step], rel=1e-5), (layout, rank, step)
