"""bench/bench_model.py (the 1.3B throughput measurement) and the GPT-1.3B baseline config it trains:

- the GPT config has attention and MLP layers only and ~1.34B parameters (formula, and a built
  full-width layer pair extrapolated to 24 pairs);
- the trainer refuses a train.seq_length above the model's max_seq_len;
- the benchmark's log parsing, kernel categories and GPU plan (checked by the trainer's loader);
- the CPU rehearsal runs the trainer rows end to end and reports numbers parsed from its logs
  (fast: KLA + GPT; slow: every model, the plain-PyTorch GPT and the profiler breakdown).
"""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_model  # noqa: E402
from tests.dist_utils import run_on_ranks  # noqa: E402

# ----------------------------------------------------------------------------- the GPT config


def _built_gpt_pair(rank, world_size):
    """gpt_1_3b at full width cut to one (attention, MLP) pair with a 512-token vocabulary."""
    import torch

    from kla_megatron.layers import KLALayer, KLAMixer
    from kla_megatron.models import load_model_config, num_parameters
    from tests import test_model_helpers as h

    h.setup_parallel()
    cfg = load_model_config("gpt_1_3b")
    small = dataclasses.replace(cfg, vocab_size=512, num_layers=2, layer_pattern="*-")
    model = h.build(small, dtype=torch.float32)
    attn, mlp = model.decoder.layers
    return {
        "total": sum(p.numel() for p in model.parameters()),
        "formula": num_parameters(small),
        "attn_layer": sum(p.numel() for p in attn.parameters()),
        "mlp_layer": sum(p.numel() for p in mlp.parameters()),
        "final_norm": sum(p.numel() for n, p in model.named_parameters() if "final" in n),
        "kla_modules": sum(isinstance(m, (KLALayer, KLAMixer)) for m in model.modules()),
        "qkv_shape": tuple(attn.self_attention.linear_qkv.weight.shape),
        "fc1_shape": tuple(mlp.mlp.linear_fc1.weight.shape),
        "rope": hasattr(model, "rotary_pos_emb"),
        "tied": model.share_embeddings_and_output_weights,
    }


def test_gpt_config_is_a_1_3b_transformer():
    from kla_megatron.models import load_model_config, num_parameters

    cfg = load_model_config("gpt_1_3b")
    assert set(cfg.layer_pattern) == {"*", "-"} and cfg.layer_pattern == "*-" * 24
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (2048, 16, None)
    assert (cfg.ffn_hidden_size, cfg.swiglu, cfg.position_embedding) == (5632, True, "rope")
    assert cfg.vocab_size == 50304 and cfg.tie_embeddings and cfg.max_seq_len >= 16384
    D, F, V = 2048, 5632, 50304
    expected = V * D + 24 * ((D + 4 * D * D) + (D + 3 * D * F)) + D  # tied head, RMSNorm weights, no biases
    assert num_parameters(cfg) == expected and 1.30e9 < expected < 1.40e9

    got = run_on_ranks(_built_gpt_pair, world_size=1)[0]
    assert got["kla_modules"] == 0 and got["rope"] and got["tied"]
    assert got["qkv_shape"] == (3 * D, D) and got["fc1_shape"] == (2 * F, D)  # MHA; SwiGLU's gate + up
    assert got["total"] == got["formula"]
    full = V * D + 24 * (got["attn_layer"] + got["mlp_layer"]) + got["final_norm"]
    assert full == num_parameters(cfg), (full, num_parameters(cfg))


def test_trainer_rejects_seq_length_above_max_seq_len():
    from kla_megatron.training.config import load_run_config
    from kla_megatron.training.model_factory import model_config

    ok = load_run_config("tiny_cpu", ["train.seq_length=256"])  # kla_tiny: max_seq_len 256
    assert model_config(ok).max_seq_len == 256
    with pytest.raises(ValueError, match=r"train.seq_length 512 is longer than the model's max_seq_len 256"):
        model_config(load_run_config("tiny_cpu", ["train.seq_length=512"]))


# ----------------------------------------------------------------------------- parsing and plan

LOG = """\
step 1/4 | loss 6.2500 | lr 1.000e-04 | grad_norm 1.000 | tokens/s 100 | TFLOP/s/device 1 | MFU 0.1% | mem 1.00GiB
step 2/4 | loss 6.2000 | lr 1.000e-04 | grad_norm 1.000 | tokens/s 3000 | TFLOP/s/device 30 | MFU 3.0% | mem 2.00GiB
step 3/4 | loss 6.1000 | lr 1.000e-04 | grad_norm 1.000 | tokens/s 1000 | TFLOP/s/device 10 | MFU 1.0% | mem 2.50GiB
step 4/4 | loss 6.0000 | lr 1.000e-04 | grad_norm 1.000 | tokens/s 1000 | TFLOP/s/device 10 | MFU 1.0% | mem 2.50GiB
"""


def test_parse_trainer_log_averages_the_last_steps_by_total_time():
    p = bench_model.parse_trainer_log(LOG, avg_last=2)
    assert p["averaged_steps"] == [3, 4] and p["tokens_per_s"] == pytest.approx(1000)
    p = bench_model.parse_trainer_log(LOG, avg_last=5)  # never the first step
    assert p["averaged_steps"] == [2, 3, 4]
    assert p["tokens_per_s"] == pytest.approx(3 / (1 / 3000 + 2 / 1000))  # total tokens / total time
    assert p["mfu_pct"] == pytest.approx(3 / (1 / 3.0 + 2 / 1.0)) and p["peak_mem_gib"] == 2.5
    assert bench_model.judge(0, LOG, p, 4) == "ok" and bench_model.judge(0, LOG, p, 6).startswith("FAIL")
    assert bench_model.judge(1, "torch.OutOfMemoryError: CUDA out of memory.", {}, 4) == "OOM"
    assert bench_model.judge(None, "", {}, 4) == "timeout"


@pytest.mark.parametrize("name, category", [
    ("_kla_fwd_kernel", "scan fwd"), ("_kla_transform_kernel", "scan fwd"), ("_kla_bwd_kernel", "scan bwd"),
    ("_sensors_bwd_kernel", "kla fused glue"), ("_gate_fwd_kernel", "kla fused glue"),
    ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNT", "matmul"), ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn", "matmul"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop>", "matmul"), ("aten::addmm", "matmul"),
    ("flash_fwd_kernel", "attention"), ("_conv_fwd_kernel", "conv"), ("_conv_bwd_window_kernel", "conv"),
    ("void at::native::vectorized_elementwise_kernel<4, convert_functor>", "other elementwise/copy"),
    ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "grad reduce (DDP)"),
])
def test_kernel_categories(name, category):
    assert bench_model.kernel_category(name) == category


def test_gpu_plan_passes_the_trainers_checks(tmp_path, capsys):
    """The default GPU rows (and an S = 32 row) load through the trainer's config loader, layout
    check and max_seq_len check; long rows get model copies with max_seq_len raised."""
    rc = bench_model.main(["--dry-run", "--models", "kla,hybrid,gpt,kla-s32,kla-selective,gpt-pytorch",
                           "--work-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "kla seq 4096: micro-batches [4, 2, 1]" in out and "gpt seq 16384: micro-batches [1]" in out
    long = bench_model.yaml.safe_load((tmp_path / "kla_L16384.yaml").read_text())
    assert long["max_seq_len"] == 16384 and long["layer_pattern"] == "K-" * 20
    assert bench_model.yaml.safe_load((tmp_path / "kla-s32_L2048.yaml").read_text())["d_state"] == 32


def test_micro_batch_search_takes_the_largest_that_fits(tmp_path, monkeypatch):
    """High to low, the first that does not run out of memory is the row; a micro-batch with as
    many tokens as one that ran out of memory at a shorter or equal seq is not tried again."""
    args = bench_model.parse_args(["--seqs", "2048,4096", "--micro-batches", "8,4,2,1", "--max-tokens", "16384",
                                   "--work-dir", str(tmp_path)])
    runner = bench_model.Runner(args, {}, 0.0)
    tried = []

    def attempt(key, seq, mb):  # memory grows with tokens: more than 8192 per micro-batch runs out
        tried.append((seq, mb))
        if mb * seq > 8192:
            return bench_model.Attempt(mb, "OOM")
        return bench_model.Attempt(mb, "ok", parsed={"tokens_per_s": 1000.0 * mb, "peak_mem_gib": 1.0})

    monkeypatch.setattr(runner, "framework_attempt", attempt)
    oom = {}
    short = runner.row("kla", 2048, None, oom)
    assert short["micro_batch"] == 4 and short["tried"] == ["8:OOM", "4:ok"] and short["status"] == "ok"
    long = runner.row("kla", 4096, None, oom)  # 4 x 4096 = 16k tokens ran out at 2048: skipped
    assert long["tried"] == ["4:OOM (inferred)", "2:ok"] and long["micro_batch"] == 2
    assert long["tokens_per_s"] == 2000.0 and tried == [(2048, 8), (2048, 4), (4096, 2)]
    none_fit = bench_model.Runner(args, {}, 0.0)
    monkeypatch.setattr(none_fit, "framework_attempt", lambda key, seq, mb: bench_model.Attempt(mb, "OOM"))
    row = none_fit.row("gpt", 4096, None, {})
    assert row["status"] == "OOM" and row["micro_batch"] is None and row["tokens_per_s"] is None
    assert row["tried"] == ["4:OOM", "2:OOM", "1:OOM"]


# ----------------------------------------------------------------------------- CPU rehearsal


def _rehearse(tmp_path, *extra):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "bench/bench_model.py", "--cpu", "--out", str(out), "--log-dir", str(tmp_path / "logs"),
           "--work-dir", str(tmp_path / "work"), *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _check_trainer_row(row, tmp_path):
    assert row["status"] == "ok" and row["micro_batch"] == 2 and row["seq"] == 64, row
    assert row["tokens_per_s"] > 0 and row["peak_mem_gib"] > 0 and row["tflops_per_device"] > 0
    attempt = row["attempts"][-1]
    log = Path(attempt["log"]).read_text()
    assert "--set train.seq_length=64" in log and "--set train.micro_batch_size=2" in log
    per_step = [float(x) for x in bench_model.re.findall(r"tokens/s (\d+)", log)]
    assert len(per_step) == 3 and attempt["parsed"]["per_step_tokens_per_s"] == per_step
    assert row["tokens_per_s"] == pytest.approx(bench_model.harmonic(per_step[1:]))  # the trainer's numbers


def test_cpu_rehearsal_trains_kla_and_gpt_rows(tmp_path):
    stdout, report = _rehearse(tmp_path, "--models", "kla,gpt", "--no-breakdown")
    assert [r["model"] for r in report["rows"]] == ["kla", "gpt"] and report["breakdown"] is None
    for row in report["rows"]:
        _check_trainer_row(row, tmp_path)
    kla, gpt = report["rows"]
    assert gpt["x_gpt"] == 1.0 and kla["x_gpt"] == pytest.approx(kla["tokens_per_s"] / gpt["tokens_per_s"])
    line = next(ln for ln in stdout.splitlines() if ln.startswith("KLA-1.3B"))
    assert f"{kla['tokens_per_s']:.0f}" in line and " ok " in line


@pytest.mark.slow
def test_cpu_rehearsal_every_model_and_the_breakdown(tmp_path):
    stdout, report = _rehearse(tmp_path)
    rows = {(r["model"], r["mode"]): r for r in report["rows"]}
    assert set(rows) == {("kla", None), ("hybrid", None), ("gpt", None), ("gpt-pytorch", "eager")}
    for key in (("kla", None), ("hybrid", None), ("gpt", None)):
        _check_trainer_row(rows[key], tmp_path)
    pt = rows[("gpt-pytorch", "eager")]
    assert pt["status"] == "ok" and pt["tokens_per_s"] > 0 and pt["x_gpt_pytorch"] == 1.0
    assert pt["attempts"][-1]["parsed"]["params"] > 0
    b = report["breakdown"]
    assert b["status"] == "ok" and b["layer_pattern"] == "K-" and (b["B"], b["L"]) == (2, 64)
    assert set(b["categories_ms"]) == set(bench_model.CATEGORY_NAMES)
    assert b["categories_ms"]["matmul"] > 0 and math.isclose(sum(b["categories_ms"].values()), b["total_ms"])
    assert "breakdown: kla_1_3b pattern K-" in stdout
