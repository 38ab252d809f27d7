"""Experiment trackers and throughput numbers: a real ``kla-pretrain`` run with TensorBoard and
wandb (offline) writes the logged scalars at the logged steps, equal to its log lines; the
throughput meter's tokens/s, TFLOP/s and MFU are the plain arithmetic of tokens, time and FLOPs."""
import glob
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODEL = "vocab_size: 512\nhidden_size: 32\nnum_layers: 2\nlayer_pattern: K-\nkla_heads: 2\nd_state: 4\n" \
        "num_attention_heads: 4\nmax_seq_len: 64\n"
STEP = re.compile(r"^step (\d+)/\d+ \| loss ([\d.]+) \| lr ([\d.e+-]+)", re.M)
VALID = re.compile(r"^step (\d+)/\d+ \| validation loss ([\d.]+)", re.M)


def _wandb_records(path):
    """Records of a wandb ``.wandb`` file: a ':W&B' header, then LevelDB-log framed protobufs
    (4-byte CRC, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last; 32 KiB blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:
            break
        parts, pos = parts + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def _wandb_history(path):
    """{step: {key: value}} from the run file's history records."""
    out = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            out.setdefault(row.pop("_step"), {}).update(row)
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    pytest.importorskip("tensorboard", reason="tensorboard is in the [dev] extra")
    tmp = tmp_path_factory.mktemp("trackers")
    (tmp / "m.yaml").write_text(MODEL)
    argv = ["kla-pretrain", "--config", str(REPO / "configs" / "tiny_cpu.yaml"), "--set", f"model={tmp / 'm.yaml'}",
            "--set", f"checkpoint.dir={tmp / 'ck'}", "--set", "checkpoint.save_interval=0",
            "--set", "train.seq_length=32", "--set", "train.micro_batch_size=2", "--set", "train.global_batch_size=2",
            "--set", "train.steps=4", "--set", "train.warmup_steps=1", "--set", "train.eval_interval=4",
            "--set", "train.eval_iters=1", "--set", "logging.interval=2", "--set", "data.kind=mock",
            "--set", f"logging.tensorboard_dir={tmp / 'tb'}", "--set", "logging.wandb.enabled=true",
            "--set", "logging.wandb.mode=offline"]
    env = dict(os.environ, WANDB_DIR=str(tmp), WANDB_SILENT="true", WANDB_MODE="offline")
    proc = subprocess.run(argv, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = {int(s): (float(loss), float(lr)) for s, loss, lr in STEP.findall(proc.stdout)}
    valid = {int(s): float(v) for s, v in VALID.findall(proc.stdout)}
    assert sorted(printed) == [2, 4] and sorted(valid) == [4], proc.stdout[-2000:]
    return tmp, printed, valid


def test_tensorboard_scalars_equal_the_log_lines(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tmp, printed, valid = tracked_run
    events = EventAccumulator(str(tmp / "tb"))
    events.Reload()
    loss = {e.step: e.value for e in events.Scalars("train/loss")}
    lr = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(loss) == sorted(printed)
    for step, (want_loss, want_lr) in printed.items():
        assert loss[step] == pytest.approx(want_loss, abs=5e-5) and lr[step] == pytest.approx(want_lr, rel=1e-3)
    assert {e.step: round(e.value, 4) for e in events.Scalars("valid/loss")} == valid
    assert {"train/grad_norm", "train/tokens_per_s", "train/tflops_per_device"} <= set(events.Tags()["scalars"])


def test_wandb_offline_run_holds_the_logged_history(tracked_run):
    tmp, printed, valid = tracked_run
    runs = glob.glob(str(tmp / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    history = _wandb_history(runs[0])
    assert sorted(history) == sorted(printed)
    for step, (want_loss, want_lr) in printed.items():
        assert history[step]["train/loss"] == pytest.approx(want_loss, abs=5e-5)
        assert history[step]["train/lr"] == pytest.approx(want_lr, rel=1e-3)
    assert {s: round(history[s]["valid/loss"], 4) for s in valid} == valid


def test_throughput_is_tokens_over_time_times_flops(monkeypatch):
    from kla_megatron.training import metrics

    clock = iter([100.0, 102.5, 110.0, 111.0, 111.0])  # start, 2.5 s later, paused 7.5 s, 1 s more
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput(flops_per_token=3e9, world_size=4, peak=989.0)
    meter.add(10_000)
    meter.pause()
    meter.resume()  # the 7.5 s pause is not counted
    meter.add(4_000)
    got = meter.report()
    tok_s = 14_000 / 3.5
    assert got["tokens_per_s"] == pytest.approx(tok_s)
    assert got["tflops_per_device"] == pytest.approx(tok_s * 3e9 / 4 / 1e12)
    assert got["mfu"] == pytest.approx(tok_s * 3e9 / 4 / 1e12 / 989.0)


def test_tensorboard_dir_without_tensorboard_is_one_clear_error(monkeypatch, tmp_path):
    import sys

    from kla_megatron.training.config import LoggingConfig
    from kla_megatron.training.metrics import Trackers

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with pytest.raises(ValueError, match=r"logging.tensorboard_dir is set but tensorboard is not installed: "
                                         r"pip install 'kla-megatron\[tensorboard\]'"):
        Trackers(LoggingConfig(tensorboard_dir=str(tmp_path / "tb")), "run", {}, enabled=True)
    assert not (tmp_path / "tb").exists()
