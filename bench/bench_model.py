"""Training throughput and memory of the 1.3B models on one GPU, through
the real trainer, against same-size transformers; and where one KLA block's time goes.

Rows (``--models``, any subset, in this order):

=============  =======================================================================================
kla            ``configs/models/kla_1_3b.yaml`` (20 x (KLA, SwiGLU MLP))
hybrid         ``configs/models/hybrid_1_3b.yaml`` (KLA with one attention layer in eight)
gpt            ``configs/models/gpt_1_3b.yaml``: the transformer built by this framework (24 x (attn, MLP))
kla-s32        kla_1_3b with ``d_state: 32``; not in the default list
kla-selective  kla_1_3b trained with ``train.recompute=selective``; not in the default list
gpt-pytorch    ``bench/gpt_pytorch.py``: the same transformer in plain PyTorch (SDPA flash, fused
               AdamW), one row per ``--pytorch-modes`` entry (compile, eager)
=============  =======================================================================================

Every framework row is one process of the product trainer, exactly as users run it::

    python -m kla_megatron.train --config configs/1.3b.yaml --set model=<copy with max_seq_len >= seq>
        --set data.kind=mock --set train.seq_length=S --set train.micro_batch_size=M
        --set train.global_batch_size=M --set train.steps=N --set logging.interval=1 ...

(bf16, Triton scan, one GPU, TP = PP = CP = 1, no checkpoints, no validation.) The model configs
are copied into ``--work-dir`` with ``max_seq_len`` raised to the row's sequence length (the
trainer rejects ``train.seq_length > max_seq_len``). Tokens/s, TFLOP/s per device and MFU are
the trainer's own numbers from its per-step log lines, averaged (total tokens over total time) over
the last ``--avg-last`` steps; the first step (compilation, autotuning) is never counted. Peak
memory is the trainer's ``mem`` (``torch.cuda.max_memory_allocated``, GiB).

Micro-batch: for each (model, seq) the candidates are the ``--micro-batches`` list (high to low)
entries with ``mb * seq <= --max-tokens`` (defaults 8,4,2,1 and 16384: mb 8 at 2048, 4 at 4096, 1 at
16384); each runs in its own process and the first that does not run out of memory is the row.
Rows run seq by seq in ``--seqs`` order (default 4096, 16384, 2048), so with ``--budget-s`` the
last seqs are the ones left out. A candidate with at least as many tokens as one that already ran out
of memory at a shorter or equal sequence (same model) is skipped as "OOM (inferred)"; the smallest
candidate always runs. ``global batch = micro-batch`` (one GPU, no accumulation).

Breakdown (``--breakdown``, default on): one KLA + one MLP layer with the embedding and LM head
(``kla_1_3b`` cut to the pattern ``K-``), B2 x L4096, bf16, built by the trainer (Float16Module,
DDP) and run forward+backward through the engine's schedule (no optimizer step) under
torch.profiler; CUDA kernel time per iteration by category of kernel name, first match wins:
KLA fused glue (``_sensors_*``, ``_gate_*``), scan bwd (``_kla_*bwd*``), scan fwd (other
``_kla_*`` kernels: forward, time-split transform), matmul (gemm / cutlass / nvjet / cuBLAS),
attention (flash / fmha / SDPA), conv (``conv``, not ``convert``), grad reduce (NCCL: DDP's
gradient reduce-scatter, one rank), other elementwise / copy / reduce. On CPU (rehearsal) the
aten ops' self CPU time stands in for kernels.

    python bench/bench_model.py --budget-s 480                   # the GPU run (JSON + .txt to $OUT)
    python bench/bench_model.py --models kla,gpt --seqs 4096 --micro-batches 4,2 --no-breakdown
    python bench/bench_model.py --cpu                                             # rehearsal

``--cpu``: the same code path on CPU with tiny versions of each model (width 64, two layer pairs
keeping each model's mix of KLA / attention / MLP, vocab 512), seq 64, fp32, PyTorch scan, a few
steps; gpt-pytorch eager only. CPU numbers say nothing about speed.

Output: every child's output on stdout (prefixed ``[row]``) and in ``<log dir>/<row>.log`` (default
``/tmp/bench_model_logs``: the device tool returns at most 8 files from ``$OUT``), the summary table,
and JSON (``--out``, default ``$OUT/bench_model.json`` if ``$OUT`` is set, else in the log dir;
rewritten after every row, so a run cut short keeps what it did) with the table and breakdown as
text beside it (``.txt``). Exit status 0 when every row ran or was left out by the budget (OOM is
a result, not a failure), 1 when a row or the breakdown failed or timed out, 2 for bad arguments
or configs the trainer would reject.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
for p in (str(REPO), str(BENCH)):
    if p not in sys.path:
        sys.path.insert(0, p)

from multigpu_suite import NO_MULTICAST, STEP_RE, Phase, run_phase  # noqa: E402

RUN_CONFIG = "configs/1.3b.yaml"
MODEL_DIR = REPO / "configs" / "models"
# key -> (label, model config, changes to the model config, extra trainer --set for the row)
FRAMEWORK_MODELS = {
    "kla": ("KLA-1.3B", "kla_1_3b", {}, {}),
    "hybrid": ("hybrid-1.3B", "hybrid_1_3b", {}, {}),
    "gpt": ("GPT-1.3B (ours)", "gpt_1_3b", {}, {}),
    "kla-s32": ("KLA-1.3B S32", "kla_1_3b", {"d_state": 32}, {}),
    "kla-selective": ("KLA-1.3B recompute=sel", "kla_1_3b", {}, {"train.recompute": "selective"}),
}
PYTORCH_GPT = "gpt-pytorch"
ALL_MODELS = (*FRAMEWORK_MODELS, PYTORCH_GPT)
OOM_RE = re.compile(r"OutOfMemoryError|CUDA out of memory|out of memory", re.I)
GPT_JSON_RE = re.compile(r"^GPT_PYTORCH_JSON (\{.*\})$", re.M)
BREAKDOWN_JSON_RE = re.compile(r"^BREAKDOWN_JSON (\{.*\})$", re.M)
# Kernel-name categories of the breakdown, first match wins (CUDA kernel names; aten op names on CPU).
CATEGORIES = (
    ("kla fused glue", re.compile(r"_sensors?_|_gate_", re.I)),
    ("scan bwd", re.compile(r"_kla_\w*(bwd|backward)", re.I)),
    ("scan fwd", re.compile(r"_kla_", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|nvjet|cublas|xmma|wgmma|s16816|^aten::(mm|addmm|bmm|baddbmm|_addmm_activation)$",
                          re.I)),
    ("attention", re.compile(r"flash|fmha|scaled_dot_product|attention|attn", re.I)),
    ("conv", re.compile(r"conv(?!ert)", re.I)),
    ("grad reduce (DDP)", re.compile(r"nccl|^c10d::", re.I)),
)
OTHER = "other elementwise/copy"
CATEGORY_NAMES = tuple(c for c, _ in CATEGORIES) + (OTHER,)


def kernel_category(name: str) -> str:
    for category, pattern in CATEGORIES:
        if pattern.search(name):
            return category
    return OTHER


# ---------------------------------------------------------------------------- model configs


def shrink_for_cpu(data: dict) -> dict:
    """A tiny version of a model config with the same mix of layers: each distinct (mixer, MLP)
    pair of the pattern once, repeated to two pairs ('K-K-', 'K-*-', '*-*-'), width 64."""
    pattern = data["layer_pattern"]
    pairs = list(dict.fromkeys(pattern[i:i + 2] for i in range(0, len(pattern), 2)))
    tiny = "".join((pairs * 2)[:max(2, len(pairs))])
    out = {**data, "vocab_size": 512, "hidden_size": 64, "num_layers": len(tiny), "layer_pattern": tiny,
           "kla_heads": 4, "d_state": min(int(data.get("d_state", 16)), 8), "num_attention_heads": 4,
           "ffn_hidden_size": None}
    if data.get("num_query_groups"):
        out["num_query_groups"] = 2
    return out


def model_yaml(key: str, seq: int, args, pattern: str | None = None) -> Path:
    """Write the row's model config into the work dir: the named config with the row's changes,
    max_seq_len >= seq, tiny under --cpu, optionally cut to ``pattern`` (the breakdown)."""
    _, name, changes, _ = FRAMEWORK_MODELS[key]
    data = yaml.safe_load((MODEL_DIR / f"{name}.yaml").read_text())
    data = {**data, **changes, "name": name + ("_s32" if changes.get("d_state") == 32 else "")}
    if args.cpu:
        data = shrink_for_cpu(data)
    if pattern:
        data.update(layer_pattern=pattern, num_layers=len(pattern))
    data["max_seq_len"] = max(int(data.get("max_seq_len", 2048)), seq)
    tag = f"_{pattern.replace('*', 'A')}" if pattern else ""
    out = Path(args.work_dir) / f"{key}{tag}_L{seq}{'_cpu' if args.cpu else ''}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {name}.yaml for bench/bench_model.py (max_seq_len {data['max_seq_len']}"
                   f"{', tiny CPU version' if args.cpu else ''}{', pattern ' + pattern if pattern else ''})\n"
                   + yaml.safe_dump(data, sort_keys=False))
    return out


def trainer_overrides(model_path: Path, seq: int, mb: int, steps: int, args, run_name: str,
                      key: str | None = None) -> list[str]:
    sets = {"model": str(model_path), "run_name": run_name, "data.kind": "mock",
            "train.seq_length": seq, "train.micro_batch_size": mb, "train.global_batch_size": mb,
            "train.steps": steps, "train.warmup_steps": 1, "train.decay_steps": "null",
            "train.eval_interval": 0, "train.precision": "fp32" if args.cpu else "bf16",
            "train.kla_backend": "torch" if args.cpu else "triton", "train.recompute": args.recompute,
            "checkpoint.dir": "null", "checkpoint.save_interval": 0, "logging.interval": 1,
            "parallel.tensor": 1, "parallel.pipeline": 1, "parallel.context": 1,
            "parallel.sequence_parallel": "false", "parallel.data": 1}
    if key is not None:
        sets.update(FRAMEWORK_MODELS[key][3])
    return [f"{k}={v}" for k, v in sets.items()] + list(args.extra_set)


def check_run_config(overrides: list[str]) -> None:
    """What the trainer checks before it builds anything (config, layout, seq <= max_seq_len)."""
    from kla_megatron.training.config import load_run_config
    from kla_megatron.training.model_factory import model_config

    cfg = load_run_config(str(REPO / RUN_CONFIG), overrides)
    cfg.validate_world(1)
    model_config(cfg)


# ---------------------------------------------------------------------------- rows


def child_env(args) -> dict:
    """Variables for every child: the repo first on PYTHONPATH, keeping what is there (wheels
    installed with ``pip --target`` on the GPU machine); no CUDA under --cpu."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, **NO_MULTICAST}
    if args.cpu:
        env.update(CUDA_VISIBLE_DEVICES="", WANDB_MODE="offline")
    return env


def start_preflight(args):
    """Versions and devices, read in a child (the driver never initialises CUDA); started first so
    that its imports overlap the driver's config checks."""
    import subprocess

    code = ("import json, platform, torch, megatron.core as mc; n = torch.cuda.device_count(); "
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
            "'megatron_core': getattr(mc, '__version__', '?'), "
            "'cuda_devices': [torch.cuda.get_device_name(i) for i in range(n)], "
            "'triton': __import__('triton').__version__ if n else None}))")
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **child_env(args)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_preflight(proc, args) -> dict:
    import subprocess

    stdout, stderr = proc.communicate(timeout=300)
    if proc.returncode:
        raise RuntimeError("preflight failed (on the GPU machine: is megatron-core installed? "
                           "`python3 -m pip install --no-deps .whl/megatron_core-*.whl`, carry ['.whl']):\n"
                           + stderr[-2000:])
    info = json.loads(stdout.strip().splitlines()[-1])
    if not args.cpu and not info["cuda_devices"]:
        raise RuntimeError("no CUDA device: run with --cpu for the CPU rehearsal")
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    info["git_commit"] = git.stdout.strip() or None
    return info


@dataclass
class Attempt:
    mb: int
    status: str
    """ok / OOM / OOM (inferred) / timeout / FAIL (...) / not run (budget)."""
    wall_s: float = 0.0
    log: str | None = None
    command: str | None = None
    parsed: dict = field(default_factory=dict)


def harmonic(values: list[float]) -> float | None:
    """Mean rate over equal-work intervals (= total work / total time)."""
    values = [v for v in values if v and v > 0]
    return len(values) / sum(1 / v for v in values) if values else None


def parse_trainer_log(text: str, avg_last: int) -> dict:
    lines = [m.groups() for m in STEP_RE.finditer(text)]
    out: dict = {"log_lines": len(lines)}
    if not lines:
        return out
    steady = lines[1:][-avg_last:] or lines  # never the first step (compilation) unless it is all we have
    tok = [float(x[3]) for x in steady]
    tfl = [float(x[4]) for x in steady]
    mfu = [float(x[5]) for x in steady if x[5] is not None]
    out.update(first_step=int(lines[0][0]), last_step=int(lines[-1][0]), total_steps=int(lines[-1][1]),
               averaged_steps=[int(x[0]) for x in steady], loss_first=float(lines[0][2]),
               loss_last=float(lines[-1][2]), tokens_per_s=harmonic(tok), tflops_per_device=harmonic(tfl),
               mfu_pct=harmonic(mfu) if mfu else None, peak_mem_gib=max(float(x[6]) for x in lines),
               per_step_tokens_per_s=[float(x[3]) for x in lines])
    return out


def error_summary(text: str) -> str:
    errs = [ln.strip() for ln in text.splitlines() if re.search(r"(Error|error:|Exception)\b", ln)]
    return errs[-1][:160] if errs else ""


def judge(rc: int | None, text: str, parsed: dict, want_steps: int | None) -> str:
    if rc is None:
        return "timeout"
    if rc != 0:
        return "OOM" if OOM_RE.search(text) else f"FAIL (rc {rc}: {error_summary(text)})"
    if want_steps is not None and parsed.get("last_step") != want_steps:
        return f"FAIL (no step {want_steps} line)"
    return "ok"


class Runner:
    def __init__(self, args, env_info: dict, start: float):
        self.args, self.env_info = args, env_info
        self.start = start
        """When the command started: --budget-s counts from here."""
        self.log_dir = Path(args.log_dir)
        self.env = child_env(args)
        if args.expandable_segments:
            self.env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        self.reserve = args.breakdown_reserve_s if args.breakdown else 0.0

    def time_left(self, reserve: float = 0.0) -> float | None:
        if self.args.budget_s is None:
            return None
        # 45 s of margin: a process past its timeout gets 30 s after SIGTERM and 10 s after SIGKILL
        # (multigpu_suite.run_phase), and the summary still has to be written.
        return self.args.budget_s - (time.time() - self.start) - reserve - 45

    def timeout_for(self, reserve: float) -> float | None:
        left = self.time_left(reserve)
        timeout = float(self.args.timeout_s)
        if left is not None:
            if left < 30:
                return None
            timeout = min(timeout, left)
        return timeout

    def run(self, name: str, argv: list[str], reserve: float) -> tuple[int | None, float, str, str] | None:
        timeout = self.timeout_for(reserve)
        if timeout is None:
            return None
        ph = Phase(name, argv, dict(self.env), int(timeout))
        log = self.log_dir / f"{name}.log"
        print(f"\n===== {name} (timeout {timeout:.0f} s)\n$ {ph.shell()}", flush=True)
        rc, wall = run_phase(ph, log, timeout)
        return rc, wall, log.read_text(errors="replace"), ph.shell()

    def framework_attempt(self, key: str, seq: int, mb: int) -> Attempt:
        a = self.args
        path = model_yaml(key, seq, a)
        name = f"{key}_L{seq}_mb{mb}"
        overrides = trainer_overrides(path, seq, mb, a.steps, a, f"bench_{name}", key)
        argv = [sys.executable, "-m", "kla_megatron.train", "--config", RUN_CONFIG,
                *[x for o in overrides for x in ("--set", o)]]
        got = self.run(name, argv, self.reserve)
        if got is None:
            return Attempt(mb, "not run (budget)")
        rc, wall, text, cmd = got
        parsed = parse_trainer_log(text, a.avg_last)
        return Attempt(mb, judge(rc, text, parsed, a.steps), round(wall, 1), str(self.log_dir / f"{name}.log"),
                       cmd, parsed)

    def pytorch_attempt(self, mode: str, seq: int, mb: int) -> Attempt:
        a, g = self.args, self.gpt_sizes()
        name = f"gpt-pytorch-{mode}_L{seq}_mb{mb}"
        argv = [sys.executable, "bench/gpt_pytorch.py", "--mode", mode, "--seq", str(seq), "--batch", str(mb),
                "--vocab", str(g["vocab"]), "--hidden", str(g["hidden"]), "--layers", str(g["layers"]),
                "--heads", str(g["heads"]), "--ffn", str(g["ffn"]), "--warmup", str(a.pytorch_warmup),
                "--steps", str(a.pytorch_steps), "--device", "cpu" if a.cpu else "cuda"]
        if g["tie"]:
            argv.append("--tie-embeddings")
        got = self.run(name, argv, self.reserve)
        if got is None:
            return Attempt(mb, "not run (budget)")
        rc, wall, text, cmd = got
        m = GPT_JSON_RE.findall(text)
        parsed = json.loads(m[-1]) if m else {}
        status = judge(rc, text, parsed, None)
        if status == "ok" and not parsed:
            status = "FAIL (no GPT_PYTORCH_JSON line)"
        if parsed:  # the table's column names, and MFU by the trainer's convention (see gpt_sizes)
            parsed["mfu_own_convention"] = parsed.pop("mfu", None)
            peak = self.env_info.get("peak_tflops")
            fpt = g["flops_per_token"][seq] if seq in g["flops_per_token"] else None
            parsed["tflops_per_device"] = parsed["tokens_per_s"] * fpt / 1e12 if fpt else None
            parsed["mfu_pct"] = 100 * parsed["tflops_per_device"] / peak if peak and fpt else None
        return Attempt(mb, status, round(wall, 1), str(self.log_dir / f"{name}.log"), cmd, parsed)

    def gpt_sizes(self) -> dict:
        """The plain-PyTorch GPT's sizes from the framework GPT's config (one source of truth), and
        the framework's FLOPs per token for it, so its MFU is counted as the trainer counts ours."""
        if not hasattr(self, "_gpt"):
            from kla_megatron.models import flops_per_token, load_model_config

            cfg = load_model_config(model_yaml("gpt", max(self.args.pytorch_seqs), self.args))
            self._gpt = dict(vocab=cfg.vocab_size, hidden=cfg.hidden_size, layers=cfg.layer_pattern.count("*"),
                             heads=cfg.num_attention_heads, ffn=cfg.ffn_hidden_size, tie=cfg.tie_embeddings,
                             flops_per_token={s: flops_per_token(cfg, s) for s in self.args.pytorch_seqs})
        return self._gpt

    def row(self, key: str, seq: int, mode: str | None, oom_tokens: dict) -> dict:
        """Try micro-batches high to low; the first that fits is the row."""
        a = self.args
        cands = candidates(a, seq)
        attempts: list[Attempt] = []
        row_key = key if mode is None else f"{key}:{mode}"
        known = [t for s, t in oom_tokens.get(row_key, []) if s <= seq]
        for i, mb in enumerate(cands):
            last = i == len(cands) - 1
            if known and mb * seq >= min(known) and not last:
                attempts.append(Attempt(mb, "OOM (inferred)"))
                continue
            att = self.pytorch_attempt(mode, seq, mb) if mode else self.framework_attempt(key, seq, mb)
            attempts.append(att)
            if att.status == "OOM":
                oom_tokens.setdefault(row_key, []).append((seq, mb * seq))
                continue
            break
        final = next((x for x in attempts if x.status == "ok"), attempts[-1])
        label = FRAMEWORK_MODELS[key][0] if mode is None else f"GPT PyTorch {mode}"
        p = final.parsed
        return {"model": key, "mode": mode, "label": label, "seq": seq,
                "micro_batch": final.mb if final.status == "ok" else None,
                "tried": [f"{x.mb}:{x.status}" for x in attempts], "status": final.status,
                "tokens_per_s": p.get("tokens_per_s") if final.status == "ok" else None,
                "tflops_per_device": p.get("tflops_per_device") if final.status == "ok" else None,
                "mfu_pct": p.get("mfu_pct") if final.status == "ok" else None,
                "peak_mem_gib": p.get("peak_mem_gib") if final.status == "ok" else None,
                "attempts": [vars(x) for x in attempts]}

    def breakdown(self) -> dict:
        a = self.args
        seq, mb = (64, 2) if a.cpu else (a.breakdown_seq, a.breakdown_mb)
        path = model_yaml(a.breakdown_model, seq, a, pattern="K-")
        argv = [sys.executable, "bench/bench_model.py", "--breakdown-worker", "--breakdown-model", a.breakdown_model,
                "--worker-model", str(path),
                "--worker-seq", str(seq), "--worker-mb", str(mb), "--worker-iters", str(a.breakdown_iters),
                "--recompute", a.recompute]
        if a.cpu:
            argv.append("--cpu")
        argv += [x for o in a.extra_set for x in ("--extra-set", o)]
        name = f"breakdown_{a.breakdown_model}_L{seq}_B{mb}"
        got = self.run(name, argv, 0.0)
        if got is None:
            return {"status": "not run (budget)"}
        rc, wall, text, cmd = got
        m = BREAKDOWN_JSON_RE.findall(text)
        out = json.loads(m[-1]) if m else {}
        status = judge(rc, text, out, None)
        if status == "ok" and not out:
            status = "FAIL (no BREAKDOWN_JSON line)"
        return {**out, "status": status, "wall_s": round(wall, 1), "command": cmd,
                "log": str(self.log_dir / f"{name}.log")}


# ---------------------------------------------------------------------------- breakdown worker


def _top_ops(prof, iters: int, cpu_type, n: int = 30) -> list[dict]:
    """The aten ops whose own kernels take the most GPU time, by input shapes: which tensor each
    elementwise/copy kernel touched (the kernel names alone do not say)."""
    ops = []
    for e in prof.key_averages(group_by_input_shape=True):
        us = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        if e.device_type == cpu_type and us > 0 and e.key.startswith("aten::"):
            ops.append({"op": e.key, "shapes": str(e.input_shapes)[:120], "ms": us / 1e3 / iters,
                        "calls": e.count // iters})
    return sorted(ops, key=lambda o: -o["ms"])[:n]


def breakdown_worker(args) -> int:
    """One KLA + one MLP layer, embedding and head: fwd+bwd through the trainer's engine, profiled."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from kla_megatron.training.config import load_run_config
    from kla_megatron.training.trainer import Trainer

    seq, mb, iters = args.worker_seq, args.worker_mb, args.worker_iters
    overrides = trainer_overrides(Path(args.worker_model), seq, mb, 1, args, "bench_breakdown", args.breakdown_model)
    trainer = Trainer(load_run_config(str(REPO / RUN_CONFIG), overrides))
    engine = trainer.engine
    batch = trainer._global_batch()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def fwd_bwd():
        for chunk in engine.chunks:
            chunk.zero_grad_buffer()
        engine._run_schedule(batch, forward_only=False)

    for _ in range(2):  # compile / autotune
        fwd_bwd()
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        fwd_bwd()
    sync()
    wall_ms = 1e3 * (time.perf_counter() - t0) / iters
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(iters):
            fwd_bwd()
        sync()
    by_cat = {c: 0.0 for c in CATEGORY_NAMES}
    launches = {c: 0 for c in CATEGORY_NAMES}
    kernels = []
    for e in prof.key_averages():
        if cuda:
            if e.device_type != DeviceType.CUDA:
                continue
            us = float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0))
        else:
            if e.device_type != DeviceType.CPU:
                continue
            us = float(e.self_cpu_time_total)
        if us <= 0:
            continue
        cat = kernel_category(e.key)
        by_cat[cat] += us / 1e3 / iters
        launches[cat] += e.count // iters
        kernels.append({"name": e.key[:200], "category": cat, "ms": us / 1e3 / iters, "calls": e.count // iters})
    kernels.sort(key=lambda k: -k["ms"])
    mc = trainer.model_cfg
    ops = _top_ops(prof, iters, DeviceType.CPU) if cuda else []
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "timing": "CUDA kernel time" if cuda
           else "CPU self time of aten ops (rehearsal only)", "model": mc.name, "layer_pattern": mc.layer_pattern,
           "hidden": mc.hidden_size, "kla_heads": mc.mixer.num_heads, "d_state": mc.mixer.d_state, "vocab": mc.vocab_size,
           "B": mb, "L": seq, "precision": trainer.run.train.precision, "iters": iters,
           "fwd_bwd_wall_ms": wall_ms, "categories_ms": by_cat, "launches_per_iter": launches,
           "total_ms": sum(by_cat.values()), "top_kernels": kernels[:25],
           "top_ops": ops}
    trainer.close()
    print("BREAKDOWN_JSON " + json.dumps(out), flush=True)
    return 0


# ---------------------------------------------------------------------------- report


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s over the framework GPT's and the plain-PyTorch GPT's at the same seq
    (the compiled PyTorch row when it ran, else eager)."""
    def ref(seq, pred):
        cands = [r for r in rows if r["seq"] == seq and pred(r) and r["tokens_per_s"]]
        cands.sort(key=lambda r: r["mode"] != "compile")
        return cands[0]["tokens_per_s"] if cands else None

    for r in rows:
        gpt = ref(r["seq"], lambda x: x["model"] == "gpt")
        pt = ref(r["seq"], lambda x: x["model"] == PYTORCH_GPT)
        tok = r["tokens_per_s"]
        r["x_gpt"] = tok / gpt if tok and gpt else None
        r["x_gpt_pytorch"] = tok / pt if tok and pt else None


NOTE = ("tokens/s: per GPU, total tokens / total time of the last steps (never the first); x GPT, x GPT-pt: over "
        "the framework GPT's and the plain-PyTorch GPT's (compiled if it ran) at the same seq; MFU: the trainer's "
        "FLOP count (models/flops.py: matmuls, full s x s attention, 16 ops per scan lane) for every row, over the "
        "device's dense bf16 peak; peak GiB: torch.cuda.max_memory_allocated; tried: micro-batches high to low.")


def table(rows: list[dict]) -> str:
    head = (f"{'model':22} {'seq':>6} {'mb':>3} {'tokens/s':>9} {'x GPT':>6} {'x GPT-pt':>8} {'MFU %':>6} "
            f"{'TFLOP/s':>8} {'peak GiB':>8}  {'status':16} tried (mb:status)")
    out = [head]
    for r in rows:
        out.append(f"{r['label'][:22]:22} {r['seq']:>6} {_fmt(r['micro_batch'], 'd'):>3} "
                   f"{_fmt(r['tokens_per_s'], '.0f'):>9} {_fmt(r.get('x_gpt'), '.2f'):>6} "
                   f"{_fmt(r.get('x_gpt_pytorch'), '.2f'):>8} {_fmt(r['mfu_pct'], '.1f'):>6} "
                   f"{_fmt(r['tflops_per_device'], '.3g'):>8} {_fmt(r['peak_mem_gib'], '.2f'):>8}  "
                   f"{r['status'][:16]:16} {', '.join(r['tried'])}")
    return "\n".join(out)


def breakdown_table(b: dict) -> str:
    if not b.get("categories_ms"):
        return f"breakdown: {b.get('status')}"
    total = b["total_ms"] or 1e-9
    lines = [f"breakdown: {b['model']} pattern {b['layer_pattern']} (+ embedding, LM head), B{b['B']}·L{b['L']}·"
             f"D{b['hidden']}, H{b['kla_heads']}, S{b['d_state']}, {b['precision']}, {b['device']}; "
             f"fwd+bwd {b['fwd_bwd_wall_ms']:.2f} ms wall per iteration; {b['timing']} per iteration:",
             f"{'category':24} {'ms':>9} {'share':>6} {'launches':>8}"]
    for c, ms in b["categories_ms"].items():
        lines.append(f"{c:24} {ms:9.3f} {100 * ms / total:5.1f}% {b['launches_per_iter'][c]:>8}")
    lines.append(f"{'total':24} {total:9.3f} 100.0%")
    lines += ["top kernels (ms per iteration, category):"]
    lines += [f"  {k['ms']:8.3f}  {k['category']:22} {k['name'][:90]}" for k in b["top_kernels"][:12]]
    if b.get("top_ops"):
        lines += ["top aten ops by their own kernels' time (ms per iteration, calls, input shapes):"]
        lines += [f"  {o['ms']:8.3f} {o['calls']:>4}  {o['op'][:28]:28} {o['shapes']}" for o in b["top_ops"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="bench_model", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", default="kla,hybrid,gpt,gpt-pytorch", help=f"subset of {','.join(ALL_MODELS)}")
    ap.add_argument("--seqs", default=None, help="sequence lengths, run in this order (default 4096,16384,2048; "
                                                 "--cpu: 64)")
    ap.add_argument("--micro-batches", default=None, help="candidates, tried high to low (default 8,4,2,1; --cpu: 2,1)")
    ap.add_argument("--max-tokens", type=int, default=None,
                    help="only candidates with mb*seq <= this (default 16384; --cpu: 128)")
    ap.add_argument("--steps", type=int, default=None, help="trainer steps per row (default 6; --cpu: 3)")
    ap.add_argument("--avg-last", type=int, default=None, help="average the last N steps (default 3; --cpu: 2)")
    ap.add_argument("--pytorch-modes", default=None, help="gpt-pytorch rows: compile,eager (default compile; --cpu: eager)")
    ap.add_argument("--pytorch-seqs", default=None, help="the gpt-pytorch rows' sequence lengths, a subset of --seqs (default: all)")
    ap.add_argument("--pytorch-warmup", type=int, default=None, help="gpt-pytorch untimed steps (default 3; --cpu: 1)")
    ap.add_argument("--pytorch-steps", type=int, default=None, help="gpt-pytorch timed steps (default 5; --cpu: 2)")
    ap.add_argument("--recompute", default="none", choices=("none", "selective", "full"), help="train.recompute")
    ap.add_argument("--extra-set", action="append", default=[], metavar="KEY=VALUE",
                    help="another trainer --set for every framework row and the breakdown (repeatable)")
    ap.add_argument("--expandable-segments", action="store_true",
                    help="PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True for every row (default: as users run it)")
    ap.add_argument("--breakdown", action=argparse.BooleanOptionalAction, default=True,
                    help="profile one KLA + MLP block (default on)")
    ap.add_argument("--breakdown-model", default="kla", choices=[k for k in FRAMEWORK_MODELS if "kla" in k])
    ap.add_argument("--breakdown-seq", type=int, default=4096)
    ap.add_argument("--breakdown-mb", type=int, default=2)
    ap.add_argument("--breakdown-iters", type=int, default=None, help="profiled iterations (default 5; --cpu: 2)")
    ap.add_argument("--breakdown-reserve-s", type=float, default=90.0,
                    help="budget the training rows leave for the breakdown (default 90 s)")
    ap.add_argument("--timeout-s", type=float, default=None, help="per process (default 300; --cpu: 240)")
    ap.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole run: "
                    "no process runs past it (rows left over are 'not run (budget)')")
    ap.add_argument("--cpu", action="store_true", help="rehearsal on CPU with tiny models")
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_model.json, else in the log dir)")
    ap.add_argument("--log-dir", default="/tmp/bench_model_logs", help="per-process logs (default /tmp/bench_model_logs)")
    ap.add_argument("--work-dir", default="/tmp/kla_bench_model", help="generated model configs")
    ap.add_argument("--dry-run", action="store_true", help="check the configs and print the plan only")
    # internal: the breakdown runs in a child process
    ap.add_argument("--breakdown-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-model", help=argparse.SUPPRESS)
    ap.add_argument("--worker-seq", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-mb", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--worker-iters", type=int, default=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cpu = args.cpu
    for name, gpu, cpu_value in (("seqs", "4096,16384,2048", "64"), ("micro_batches", "8,4,2,1", "2,1"),
                                 ("max_tokens", 16384, 128), ("steps", 6, 3), ("avg_last", 3, 2),
                                 ("pytorch_modes", "compile", "eager"), ("pytorch_warmup", 3, 1),
                                 ("pytorch_steps", 5, 2), ("breakdown_iters", 5, 2), ("timeout_s", 300, 240)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_value if cpu else gpu)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in args.models if m not in ALL_MODELS]
    if bad or not args.models:
        ap.error(f"--models: unknown {bad}; choose from {','.join(ALL_MODELS)}")
    args.seqs, args.micro_batches = _ints(args.seqs), sorted(set(_ints(args.micro_batches)), reverse=True)
    args.pytorch_seqs = _ints(args.pytorch_seqs) if args.pytorch_seqs else list(args.seqs)
    args.pytorch_modes = [m.strip() for m in args.pytorch_modes.split(",") if m.strip()]
    if not set(args.pytorch_modes) <= {"compile", "eager"}:
        ap.error("--pytorch-modes: choose from compile,eager")
    if not args.seqs or not args.micro_batches or min(args.seqs + args.micro_batches + args.pytorch_seqs) < 1:
        ap.error("--seqs and --micro-batches need positive integers")
    if not set(args.pytorch_seqs) <= set(args.seqs):
        ap.error("--pytorch-seqs must be a subset of --seqs")
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is never averaged)")
    args.log_dir = str(Path(args.log_dir).resolve())
    args.work_dir = str(Path(args.work_dir).resolve())
    if args.out is None:
        args.out = str(Path(os.environ.get("OUT") or args.log_dir) / "bench_model.json")
    args.out = str(Path(args.out).resolve())
    return args


def plan(args) -> list[tuple[str, int, str | None]]:
    """(model key, seq, pytorch mode) in run order: seq-major, so the first seqs get the budget."""
    out = []
    for seq in args.seqs:
        for key in args.models:
            if key == PYTORCH_GPT:
                out += [(key, seq, mode) for mode in args.pytorch_modes if seq in args.pytorch_seqs]
            else:
                out.append((key, seq, None))
    return out


def candidates(args, seq: int) -> list[int]:
    return [mb for mb in args.micro_batches if mb * seq <= args.max_tokens] or [min(args.micro_batches)]


def main(argv=None) -> int:
    start = time.time()
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    args = parse_args(argv)
    if args.breakdown_worker:
        return breakdown_worker(args)
    items = plan(args)
    pre = None if args.dry_run else start_preflight(args)
    try:  # every framework row's config through the trainer's own checks, before anything runs
        for key, seq, mode in items:
            if mode is None:
                mb = min(args.micro_batches)
                check_run_config(trainer_overrides(model_yaml(key, seq, args), seq, mb, args.steps, args, "check", key))
    except ValueError as exc:
        print(f"bench_model: error: {exc}", file=sys.stderr)
        if pre is not None:
            pre.kill()
        return 2
    mode_name = "cpu rehearsal" if args.cpu else "gpu"
    names = [k + (":" + m if m else "") + f"@{s}" for k, s, m in items]
    print(f"bench_model: {mode_name}; rows {names}; "
          f"micro-batches {args.micro_batches} (mb*seq <= {args.max_tokens}); {args.steps} steps, last "
          f"{args.avg_last} averaged; breakdown {'on' if args.breakdown else 'off'}; logs {args.log_dir}")
    if args.dry_run:
        for key, seq, mode in items:
            print(f"  {key}{':' + mode if mode else ''} seq {seq}: micro-batches {candidates(args, seq)}")
        return 0
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    try:
        env_info = finish_preflight(pre, args)
    except (RuntimeError, OSError, ValueError) as exc:
        print(f"bench_model: {exc}", file=sys.stderr)
        return 2
    if env_info.get("cuda_devices"):
        from kla_megatron.training.metrics import PEAK_TFLOPS

        name = env_info["cuda_devices"][0]
        env_info["peak_tflops"] = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    print(f"bench_model: {json.dumps(env_info)}", flush=True)
    runner = Runner(args, env_info, start)
    report = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
              "mode": mode_name, "env": env_info, "args": vars(args), "rows": [], "breakdown": None}
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    oom_tokens: dict = {}
    for key, seq, mode in items:
        report["rows"].append(runner.row(key, seq, mode, oom_tokens))
        add_ratios(report["rows"])
        out_path.write_text(json.dumps(report, indent=1))
    if args.breakdown:
        report["breakdown"] = runner.breakdown()
        out_path.write_text(json.dumps(report, indent=1))
    rows = sorted(report["rows"], key=lambda r: (r["seq"], ALL_MODELS.index(r["model"]), r["mode"] or ""))
    env = env_info
    text = [f"===== bench_model summary ({mode_name}; {env.get('cuda_devices') or 'no GPU'}; torch {env.get('torch')}, "
            f"triton {env.get('triton')}, megatron-core {env.get('megatron_core')}, commit {env.get('git_commit')}; "
            f"{report['date_utc']} UTC; {time.time() - runner.start:.0f} s)", table(rows), NOTE]
    if report["breakdown"] is not None:
        text += ["", breakdown_table(report["breakdown"])]
    summary = "\n".join(text)
    print("\n" + summary)
    out_path.with_suffix(".txt").write_text(summary + "\n")
    print(f"\nJSON: {out_path} (text: {out_path.with_suffix('.txt')})")
    failed = [r for r in report["rows"] if r["status"].startswith(("FAIL", "timeout"))]
    if report["breakdown"] is not None and report["breakdown"]["status"].startswith(("FAIL", "timeout")):
        failed.append(report["breakdown"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
