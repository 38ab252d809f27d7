"""GPU: the 125M config trains on one GPU with the Triton scan in bf16; prints the throughput
numbers from its log line (tokens/s, TFLOP/s per GPU, MFU) for bench/README.md."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"step (\d+)/\d+ \| loss ([\d.]+) .*tokens/s (\d+) \| TFLOP/s/device ([\d.e+-]+)(?: \| MFU ([\d.]+)%)?")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_125m_trains_on_one_gpu_with_triton_bf16(tmp_path):
    steps = int(os.environ.get("KLA_GPU_TEST_STEPS", "60"))
    cmd = [sys.executable, "-m", "kla_megatron.train", "--config", str(REPO / "configs" / "125m.yaml"),
           "--set", "data.kind=mock", "--set", f"train.steps={steps}", "--set", "train.warmup_steps=10",
           "--set", "train.kla_backend=triton", "--set", "train.precision=bf16",
           "--set", "train.eval_interval=0", "--set", f"checkpoint.dir={tmp_path / 'ck'}",
           "--set", "logging.interval=10"]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - started
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [LINE.search(line) for line in proc.stdout.splitlines()]
    rows = [(int(m[1]), float(m[2]), int(m[3]), float(m[4]), m[5] and float(m[5])) for m in rows if m]
    assert len(rows) >= 3, proc.stdout[-2000:]
    assert rows[-1][1] < rows[0][1], "loss did not fall"
    step, _, tok_s, tflops, mfu = rows[-1]  # steady state (the first interval includes Triton compiles)
    # The steady rate beats the whole run's average (which includes start-up and compiles).
    train = yaml.safe_load((REPO / "configs" / "125m.yaml").read_text())["train"]
    assert tok_s >= steps * train["global_batch_size"] * train["seq_length"] / wall, (tok_s, wall)
    # TFLOP/s = tokens/s × training FLOPs per token (checked in test_model_config.py) on one GPU;
    # MFU against the dense bf16 datasheet peak of an H100 SXM / H200 (989 TFLOP/s).
    from kla_megatron.models import flops_per_token, load_model_config

    expected = tok_s * flops_per_token(load_model_config("kla_125m"), train["seq_length"]) / 1e12
    assert tflops == pytest.approx(expected, rel=5e-3), (tflops, expected)  # the log prints 3 digits
    name = torch.cuda.get_device_name()
    if "H100" in name or "H200" in name:
        # both printed rounded: TFLOP/s to 3 digits, MFU to 0.1 %
        assert abs(mfu - 100 * tflops / 989.0) <= 5e-3 * mfu + 0.05, (mfu, tflops)
    print(f"\n125M on {torch.cuda.get_device_name()}: step {step}: tokens/s {tok_s}, "
          f"TFLOP/s per GPU {tflops:.1f}, MFU {mfu:.1f}%")
    assert (tmp_path / "ck" / f"iter_{steps:07d}" / "manifest.json").exists()
