"""GPU: the 125M config trains on one GPU with the Triton scan in bf16; prints the throughput
numbers from its log line (tokens/s, TFLOP/s per GPU, MFU) for bench/README.md."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [LINE.search(line) for line in proc.stdout.splitlines()]
    rows = [(int(m[1]), float(m[2]), int(m[3]), float(m[4]), m[5] and float(m[5])) for m in rows if m]
    assert len(rows) >= 3, proc.stdout[-2000:]
    assert rows[-1][1] < rows[0][1], "loss did not fall"
    step, _, tok_s, tflops, mfu = rows[-1]  # steady state (the first interval includes Triton compiles)
    assert tok_s > 0 and tflops > 0 and mfu is not None and 0 < mfu < 100
    print(f"\n125M on {torch.cuda.get_device_name()}: step {step}: tokens/s {tok_s}, "
          f"TFLOP/s per GPU {tflops:.1f}, MFU {mfu:.1f}%")
    assert (tmp_path / "ck" / f"iter_{steps:07d}" / "manifest.json").exists()
