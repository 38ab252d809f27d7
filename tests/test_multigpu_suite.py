"""bench/multigpu_suite.py (the multi-GPU session's driver): the GPU plan is well formed and accepted by the
trainer's own config validator, and a short CPU rehearsal (gloo ranks) trains, checkpoints at
TP=2, resumes at DP=2 and parses its own logs."""
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _suite():
    spec = importlib.util.spec_from_file_location("multigpu_suite", REPO / "bench" / "multigpu_suite.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _overrides(train_args):
    return dict(train_args[i + 1].split("=", 1) for i, a in enumerate(train_args) if a == "--set")


@pytest.mark.parametrize("gpus", [4, 2])
def test_gpu_plan_is_well_formed_and_passes_the_trainers_validator(gpus, tmp_path):
    from kla_megatron.training.config import load_run_config

    suite = _suite()
    args = suite.parse_args(["--dry-run", "--gpus", str(gpus), "--work-dir", str(tmp_path / "work"),
                             "--log-dir", str(tmp_path / "logs")])
    phases = suite.build_plan(args)
    assert [p.name for p in phases] == list(suite.PHASES)
    suite.check_plan(phases)
    by_name = {p.name: p for p in phases}

    tests = by_name["tests"]
    assert tests.argv[1:3] == ["-m", "pytest"] and "multigpu" in tests.argv
    for f in suite.GPU_TEST_FILES:
        assert f in tests.argv and "pytest.mark.multigpu" in (REPO / f).read_text()

    bench = by_name["cp_bench"].argv
    known = set(re.findall(r'add_argument\("(--[\w-]+)"', (REPO / "bench" / "bench_cp.py").read_text()))
    assert {a for a in bench if a.startswith("--")} <= known
    assert bench[bench.index("--cp") + 1:bench.index("--json-out")] == [str(c) for c in (1, 2, 4) if c <= gpus]

    layouts = {}
    for name in suite.TRAIN_PHASES:
        ph = by_name[name]
        assert ph.argv[:2] == ["bash", "launch/torchrun.sh"] and (REPO / ph.argv[1]).exists()
        assert ph.env["GPUS_PER_NODE"] == str(gpus) and ph.argv[2:4] == ["--config", "configs/1.3b.yaml"]
        sets = _overrides(ph.train_args)
        cfg = load_run_config(str(REPO / "configs/1.3b.yaml"), [f"{k}={v}" for k, v in sets.items()])
        assert cfg.validate_world(gpus) == cfg.parallel.data
        assert cfg.data.kind == "mock" and cfg.train.eval_interval == 0
        layouts[name] = (cfg.parallel.tensor, cfg.parallel.context, cfg.parallel.data)
    assert layouts == {"train_dp": (1, 1, gpus), "train_tp": (2, 1, gpus // 2), "train_cp": (1, gpus, 1),
                       "resume": (1, 1, gpus)}

    tp, resume, cp = (_overrides(by_name[n].train_args) for n in ("train_tp", "resume", "train_cp"))
    assert resume["checkpoint.resume"] == str(Path(tp["checkpoint.dir"]) / f"iter_{int(tp['train.exit_at_step']):07d}")
    assert resume["train.steps"] == tp["train.steps"]  # the same schedule, continued
    assert not Path(tp["checkpoint.dir"]).is_relative_to(tmp_path / "logs")
    assert cp["train.seq_length"] == "65536" and cp["train.recompute"] == "full"
    assert "max_seq_len: 65536" in Path(cp["model"]).read_text()

    out = subprocess.run([sys.executable, "bench/multigpu_suite.py", "--dry-run", "--gpus", str(gpus),
                          "--work-dir", str(tmp_path / "work")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in suite.PHASES:
        assert f"[{name}]" in out.stdout


def test_a_layout_the_trainer_rejects_fails_before_anything_runs(tmp_path):
    out = subprocess.run([sys.executable, "bench/multigpu_suite.py", "--dry-run", "--gpus", "3", "--phases", "train_dp",
                          "--work-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "phase train_dp: batch sizes: global_batch_size 64 is not divisible" in out.stderr


def test_log_parsers():
    suite = _suite()
    text = ("step 10/30 | loss 3.6154 | lr 6.000e-04 | grad_norm 0.279 | tokens/s 59559 | TFLOP/s/device 44.9 | "
            "MFU 4.5% | mem 21.84GiB\n"
            "step 20/30 | loss 0.0345 | lr 3.722e-04 | grad_norm 0.041 | tokens/s 74929 | TFLOP/s/device 56.5 | "
            "MFU 5.7% | mem 21.84GiB\n"
            "step 30/30 | loss 0.0126 | lr 6.332e-05 | grad_norm 0.022 | tokens/s 76304 | TFLOP/s/device 57.5 | "
            "MFU 5.8% | mem 22.10GiB\n")
    p = suite.parse_train(text, world=4)
    assert (p["first_step"], p["last_step"], p["steady_intervals"]) == (10, 30, 2)
    assert p["tokens_per_s_per_gpu"] == pytest.approx((74929 + 76304) / 2 / 4)
    assert p["tflops_per_device"] == pytest.approx(57.0) and p["mfu_pct"] == pytest.approx(5.75)
    assert p["mem_gib"] == 22.10
    counts = suite.parse_pytest("FAILED tests/test_x.py::test_a - boom\n1 failed, 5 passed, 2 skipped in 3.2s\n")
    assert counts["failed"] == 1 and counts["passed"] == 5 and counts["skipped"] == 2
    assert counts["failed_tests"] == ["tests/test_x.py::test_a"]


@pytest.mark.slow
def test_cpu_rehearsal_trains_saves_at_tp2_and_resumes_at_dp2(tmp_path):
    logs = tmp_path / "logs"
    cmd = [sys.executable, "bench/multigpu_suite.py", "--cpu", "--gpus", "2", "--phases", "train_dp,train_tp,resume",
           "--steps", "2", "--resume-steps", "2", "--log-interval", "1", "--log-dir", str(logs),
           "--work-dir", str(tmp_path / "work"), "--timeout-s", "240"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=800)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    report = json.loads((logs / "multigpu_summary.json").read_text())
    r = {p["phase"]: p for p in report["phases"]}
    assert [p["status"] for p in report["phases"]] == ["ok", "ok", "ok"]
    for name in ("train_dp", "train_tp", "resume"):
        assert (logs / f"{name}.log").exists() and r[name]["parsed"]["tokens_per_s_per_gpu"] > 0
    assert r["train_tp"]["parsed"]["saved_checkpoint"].endswith("iter_0000002")
    resumed = r["resume"]["parsed"]
    assert resumed["resumed_step"] == 2 and (resumed["first_step"], resumed["last_step"]) == (3, 4)
    assert "'tensor': 2" in resumed["resume_note"] and "'data': 2" in resumed["resume_note"]
    # DP=2 and TP=2 see the same global batches from the same initialisation: the same losses.
    assert r["train_tp"]["parsed"]["loss_last"] == pytest.approx(r["train_dp"]["parsed"]["loss_last"], rel=1e-3)
    assert "===== summary" in out.stdout
