"""DeepSpeed engine: ZeRO-2 on 2 CPU ranks trains and resumes (straight run vs stop + resume).

deepspeed is in the [dev] extra (CI installs it). On CPU the engine compiles nothing (DeepSpeed's
shared-memory comm op, a C++ build of minutes, serves only inference) and sizes the ZeRO reduce
bucket to the model (DeepSpeed's default allocates 2 GB per micro-step): ~25 s here."""
import math

import pytest

pytest.importorskip("deepspeed")

from tests.dist_utils import run_on_ranks  # noqa: E402
from tests.test_train import _runs, model_yaml  # noqa: E402,F401  (fixture re-export)

from tests.test_train import _argv  # noqa: E402


def _ds_argv(model_yaml, ckpt_dir, *extra):
    return _argv(model_yaml, ckpt_dir, "--set", "engine=deepspeed", "--set", "deepspeed.zero_stage=2",
                 "--set", "train.nan_policy=abort", "--set", "train.micro_batch_size=1", *extra)


def test_deepspeed_zero2_trains_and_resumes(model_yaml, tmp_path, monkeypatch):
    extensions = tmp_path / "torch_extensions"  # where DeepSpeed would build its ops (the ranks inherit it)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    runs = [
        _ds_argv(model_yaml, tmp_path / "a", "--set", "train.lr=1e-2"),
        _ds_argv(model_yaml, tmp_path / "b", "--set", "train.lr=1e-2", "--set", "train.exit_at_step=3"),
        _ds_argv(model_yaml, tmp_path / "b", "--set", "train.lr=1e-2"),
    ]
    straight, first, second = run_on_ranks(_runs, world_size=2, args=(runs,))[0]
    losses = [straight["losses"][s] for s in range(1, 7)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert second["start"] == 3 and second["resumed_from"].endswith("iter_0000003")
    for step in (1, 2, 3):
        assert first["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6), step
    for step in (4, 5, 6):
        assert second["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-5), step
    assert not extensions.exists()  # nothing was compiled


def test_deepspeed_reduce_bucket_fits_the_model():
    from kla_megatron.training.config import load_run_config
    from kla_megatron.training.deepspeed_engine import REDUCE_BUCKET, deepspeed_config

    run = load_run_config("tiny_cpu", ["engine=deepspeed", "train.nan_policy=abort"])
    assert deepspeed_config(run, 2, n_params=123_456)["zero_optimization"]["reduce_bucket_size"] == 1_000_000
    assert deepspeed_config(run, 2, n_params=2_500_000)["zero_optimization"]["reduce_bucket_size"] == 3_000_000
    assert deepspeed_config(run, 2, n_params=7 * 10**9)["zero_optimization"]["reduce_bucket_size"] == REDUCE_BUCKET
