"""The training job under context parallelism: CP=2 (two gloo ranks) trains like CP=1 (one rank).

Hybrid tiny model (KLA + attention), fp32, deterministic. Two runs per layout:

- sample corpus, packed documents: 3 rows of 32 tokens flattened to one row of 96, so the row
  ends (document ends) at 32 and 64 fall inside the load-balanced chunks of 24 and documents
  cross the shard boundaries; the loss mask is thinned unevenly (first tokens of each row and
  every label divisible by 3), so the CP ranks hold different token counts and the loss and
  gradient reduction must weigh them right;
- mock data, unpacked, two rows per micro-batch.
"""
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

STEPS = 3


def _argv(model_yaml, context, *extra):
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--set", f"model={model_yaml}",
            "--set", f"parallel.context={context}", "--set", "checkpoint.dir=null",
            "--set", "train.seq_length=32", "--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=1",
            "--set", "train.eval_interval=0", "--set", "train.deterministic=true", "--set", "logging.interval=100",
            *extra]


def _thinned_collate(original):
    """Wrap data._collate: drop the loss on the first 5 tokens of every row and on every label
    divisible by 3 (an uneven split of counted tokens between CP ranks)."""

    def collate(dataset, indices):
        batch = original(dataset, indices)
        mask = batch["loss_mask"].clone()
        mask[:, :5] = 0
        mask[batch["labels"] % 3 == 0] = 0
        batch["loss_mask"] = mask
        return batch

    return collate


def _train(rank, world, model_yaml, data_dir, context):
    from data_tools.prepare_sample import prepare_sample
    from kla_megatron.train import run
    from kla_megatron.training import data

    sample = prepare_sample(data_dir, vocab_size=512)  # idempotent: the CP=1 run builds it
    packed = ("--set", "data.kind=indexed", "--set", "data.packed_documents=true", "--set", "data.split=90,10,0",
              "--set", f"data.blend=[{sample['data_prefix']}]", "--set", f"data.tokenizer={sample['tokenizer_model']}",
              "--set", "train.micro_batch_size=3", "--set", "train.global_batch_size=6")
    mock = ("--set", "data.kind=mock", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=4")
    out = {}
    original = data._collate
    data._collate = _thinned_collate(original)
    try:
        h = run(_argv(model_yaml, context, *packed))
    finally:
        data._collate = original
    out["packed"] = h
    out["mock"] = run(_argv(model_yaml, context, *mock))
    return {k: {"losses": dict(h.losses), "grad_norms": dict(h.grad_norms)} for k, h in out.items()}


def test_cp2_training_matches_cp1(tmp_path):
    model_yaml = write_tiny_model(tmp_path / "tiny_cp.yaml", max_seq_len=128)
    data_dir = str(tmp_path / "data")
    (single,) = run_on_ranks(_train, world_size=1, args=(model_yaml, data_dir, 1))
    cp_ranks = run_on_ranks(_train, world_size=2, args=(model_yaml, data_dir, 2))
    for kind in ("packed", "mock"):
        ref = single[kind]
        assert sorted(ref["losses"]) == list(range(1, STEPS + 1)), kind
        for res in cp_ranks:
            assert sorted(res[kind]["losses"]) == sorted(ref["losses"]), kind
            for step, loss in ref["losses"].items():
                # fp32 round-off (the CP scan and attention sum in another order); weighing each
                # rank's tokens by its own count instead puts the grad norm ~2e-3 off.
                assert res[kind]["losses"][step] == pytest.approx(loss, rel=1e-6), (kind, step)
                assert res[kind]["grad_norms"][step] == pytest.approx(ref["grad_norms"][step], rel=1e-5), (kind, step)
    # the run did learn something (the comparison is not between two constant losses)
    assert single["packed"]["losses"][STEPS] < single["packed"]["losses"][1]


@pytest.mark.parametrize("overrides, message", [
    (["parallel.context=2", "train.seq_length=30"],
     "train.seq_length 30 is not divisible by 2*context = 4"),
    (["parallel.context=4", "train.seq_length=36"],
     "train.seq_length 36 is not divisible by 2*context = 8"),
    (["parallel.context=2", "engine=deepspeed", "train.nan_policy=abort"],
     "engine 'deepspeed' does not support parallel.context=2"),
])
def test_context_parallel_config_errors(overrides, message):
    from kla_megatron.training.config import load_run_config

    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        load_run_config("tiny_cpu", overrides)


def test_context_parallel_config_accepts_divisible_lengths():
    from kla_megatron.training.config import load_run_config

    run = load_run_config("tiny_cpu", ["parallel.context=2", "train.seq_length=36"])
    assert run.parallel.context == 2 and run.validate_world(4) == 2
