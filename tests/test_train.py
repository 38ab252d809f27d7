"""Pretraining job on CPU/gloo: loss falls, exact resume, resume under another layout,
corrupt-checkpoint fallback, SIGTERM checkpointing."""
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import run_on_ranks
from tests.tiny_models import write_tiny_model

REPO = Path(__file__).resolve().parents[1]

def _argv(model_yaml, ckpt_dir, *extra):
    return ["--config", str(REPO / "configs" / "tiny_cpu.yaml"),
            "--set", f"model={model_yaml}", "--set", f"checkpoint.dir={ckpt_dir}",
            "--set", "train.seq_length=32", "--set", "train.micro_batch_size=2",
            "--set", "train.global_batch_size=4", "--set", "train.steps=6", "--set", "train.warmup_steps=1",
            "--set", "train.eval_interval=0", "--set", "train.deterministic=true",
            "--set", "checkpoint.keep_last=0", "--set", "logging.interval=1", "--set", "data.kind=mock", *extra]


def _runs(rank, world, runs):
    """Several training runs, one after another, in the same process group."""
    import warnings

    from kla_megatron.train import run

    out = []
    for argv in runs:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h = run(argv)
        out.append({"losses": dict(h.losses), "valid": dict(h.valid), "start": h.start_step, "resumed_from": h.resumed_from,
                    "final": h.final_step, "warnings": [str(w.message) for w in caught]})
    return out


@pytest.fixture(scope="module")
def model_yaml(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny_test.yaml")


def test_tiny_model_loss_falls_on_the_sample_corpus(model_yaml, tmp_path):
    """Real text (data_tools' sample corpus, indexed dataset, packed documents), validation on."""
    from data_tools.prepare_sample import prepare_sample

    sample = prepare_sample(str(tmp_path / "data"), vocab_size=512)
    argv = _argv(model_yaml, tmp_path / "ck", "--set", "train.steps=30", "--set", "train.deterministic=false",
                 "--set", "train.lr=5e-3", "--set", "data.kind=indexed", "--set", "data.split=90,10,0",
                 "--set", f"data.blend=[{sample['data_prefix']}]", "--set", f"data.tokenizer={sample['tokenizer_model']}",
                 "--set", "train.eval_interval=15", "--set", "train.eval_iters=1")
    (res,) = run_on_ranks(_runs, world_size=1, args=([argv],))[0]
    losses = [res["losses"][s] for s in sorted(res["losses"])]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.8, f"loss did not fall: first5 {first:.3f} last5 {last:.3f}"
    assert sorted(res["valid"]) == [15, 30] and res["valid"][30] < res["valid"][15]
    assert (tmp_path / "ck" / "iter_0000030" / "manifest.json").exists()
    from kla_megatron.models import KLAModelConfig

    saved = tmp_path / "ck" / "iter_0000030" / "model_config.yaml"
    assert KLAModelConfig.from_yaml(saved) == KLAModelConfig.from_yaml(model_yaml)


def test_nonfinite_loss_aborts_and_keeps_the_last_good_checkpoint(model_yaml, tmp_path):
    """An absurd lr blows the weights up after step 1; step 2's loss is non-finite."""
    ck = tmp_path / "ck"
    common = ("--set", "train.lr=1e30", "--set", "train.min_lr=1e30", "--set", "train.warmup_steps=0",
              "--set", "train.clip_grad=0", "--set", "checkpoint.save_interval=1")
    runs = [_argv(model_yaml, ck, *common, "--set", "train.nan_policy=abort"),
            _argv(model_yaml, tmp_path / "ck2", *common, "--set", "train.nan_policy=skip",
                  "--set", "train.max_skipped_steps=2")]
    abort, skip = run_on_ranks(_fails, world_size=1, args=(runs,))[0]
    assert abort.startswith("step 2: non-finite") and "aborting" in abort
    from kla_megatron.checkpoint import directory as checkpoint

    assert [s for s, _ in checkpoint.complete_checkpoints(str(ck))] == [1]
    assert skip.startswith("step 4: non-finite") and "aborting" in skip  # skipped steps 2 and 3, then gave up
    # skipped steps leave the weights alone, so saving after them is fine; step 4 was never saved
    assert [s for s, _ in checkpoint.complete_checkpoints(str(tmp_path / "ck2"))] == [1, 2, 3]


def _fails(rank, world, runs):
    from kla_megatron.train import run
    from kla_megatron.training.trainer import NonFiniteError

    messages = []
    for argv in runs:
        try:
            run(argv)
        except NonFiniteError as exc:
            messages.append(str(exc))
        else:
            raise AssertionError("training did not stop on a non-finite loss")
    return messages


def test_exact_resume_and_layout_change(model_yaml, tmp_path):
    a, b, t = tmp_path / "a", tmp_path / "b", tmp_path / "t"
    runs = [
        _argv(model_yaml, a, "--set", "checkpoint.save_interval=3"),                 # DP=2 straight
        _argv(model_yaml, b, "--set", "train.exit_at_step=3"),                       # DP=2 first half
        _argv(model_yaml, b),                                                        # DP=2 auto-resume
        _argv(model_yaml, t, "--set", "checkpoint.save_interval=3", "--set", "parallel.tensor=2"),  # TP=2
    ]
    straight, first_half, second_half, tp2 = run_on_ranks(_runs, world_size=2, args=(runs,))[0]
    assert sorted(first_half["losses"]) == [1, 2, 3]
    assert second_half["start"] == 3 and second_half["resumed_from"].endswith("iter_0000003")
    for step in (4, 5, 6):  # bitwise: deterministic CPU run
        assert second_half["losses"][step] == straight["losses"][step], step
    assert [first_half["losses"][s] for s in (1, 2, 3)] == [straight["losses"][s] for s in (1, 2, 3)]

    # Corrupt the newest checkpoint of run a: the auto-resume must fall back to iter 3.
    victim = next(p for p in sorted((a / "iter_0000006" / "model").iterdir()) if p.suffix == ".distcp")
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    runs = [
        _argv(model_yaml, a),                                                         # DP=2 -> DP=1 (auto)
        _argv(model_yaml, tmp_path / "t1", "--set", f"checkpoint.resume={t / 'iter_0000003'}"),  # TP=2 -> TP=1
    ]
    dp1, tp1 = run_on_ranks(_runs, world_size=1, args=(runs,))[0]
    assert any("skipping checkpoint" in w and "iter_0000006" in w and "bytes" in w for w in dp1["warnings"])
    assert dp1["resumed_from"].endswith("iter_0000003") and dp1["start"] == 3
    for step in (4, 5, 6):
        assert dp1["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-5, abs=1e-5), step
        assert tp1["losses"][step] == pytest.approx(tp2["losses"][step], rel=1e-5, abs=1e-5), step


def test_sigterm_writes_a_complete_loadable_checkpoint(model_yaml, tmp_path):
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "kla_megatron.train"] + _argv(
        model_yaml, ck, "--set", "train.steps=1000", "--set", "train.deterministic=false")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    deadline = time.time() + 180
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 2/"):
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines[-20:])
    out, _ = proc.communicate(timeout=120)
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text[-3000:]
    assert "checkpointing at step" in text
    from kla_megatron.checkpoint import directory as checkpoint

    latest = checkpoint.latest(str(ck))
    assert latest is not None, text[-2000:]
    step = checkpoint.read_manifest(latest)["step"]
    assert 2 <= step < 1000
    assert not any(p.name.endswith(".tmp") for p in ck.iterdir())
    # loadable: resume from it and take one more step
    (res,) = run_on_ranks(_runs, world_size=1, args=([_argv(
        model_yaml, ck, "--set", f"train.steps={step + 1}", "--set", "train.deterministic=false",
        "--set", "train.warmup_steps=0")],))[0]
    assert res["start"] == step and list(res["losses"]) == [step + 1]


def test_cli_output_is_a_banner_steps_and_a_summary_without_library_warnings(tmp_path):
    """kla-pretrain prints what runs (banner), progress and an end summary; no library warnings
    (our own notices are plain lines). Run twice: the second time it resumes and says the run is done."""
    import subprocess
    import sys

    argv = [sys.executable, "-m", "kla_megatron.train", "--config", "tiny_cpu", "--set", "data.kind=mock",
            "--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", f"checkpoint.dir={tmp_path / 'ck'}",
            "--set", "logging.interval=1"]
    first = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    out = first.stdout + first.stderr
    lines = out.splitlines()
    assert "building datasets (mock) ..." in lines and any(s.startswith("building datasets: done in") for s in lines)
    assert any(s.startswith("building the model and optimizer: done in") for s in lines)
    assert "run tiny_cpu: model kla_tiny (K-K-" in out and "fresh start" in out
    assert "done: 2 steps to step 2/2: 2,048 tokens" in out and "iter_0000002" in out
    # our own notices are the only lines with the CLI's prefix (tests of checkpoint faults count them)
    assert not [s for s in lines if s.startswith("kla-pretrain: ")]
    second = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0 and "the run is complete" in out2
    for text in (out, out2):
        noisy = [line for line in text.splitlines() if "Warning" in line or "warnings.warn" in line
                 or "Unable to save" in line]
        assert not noisy, noisy
