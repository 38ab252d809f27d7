"""The multi-GPU session in a few commands: the multi-GPU tests, the context-parallel benchmark and the
4-GPU pretraining runs, each phase a subprocess with its own timeout, every command's output
teed into a log folder, and a summary table (also written as JSON) at the end.

Phases, in order (``--phases`` picks a subset; the order stays):

=========  =================================================================================
tests      ``pytest -m multigpu tests/test_model_gpu.py tests/test_cp_gpu.py`` (NCCL equivalence)
cp_bench   ``bench/bench_cp.py --cp 1 2 4``: weak (8k/16k/32k tokens per GPU) and strong (64k)
train_dp   ``configs/1.3b.yaml``, mock data, DP = G (all GPUs data parallel)
train_tp   the same at TP = 2 x DP = G/2; stops at ``--steps`` (``train.exit_at_step``) and
           saves a checkpoint in ``--work-dir`` (the schedule spans ``--steps + --resume-steps``)
train_cp   long context: ``--long-seq`` tokens per sequence (64k) at CP = G, full recompute
resume     the train_tp checkpoint resumed at DP = G for ``--resume-steps`` more steps
=========  =================================================================================

Every training phase launches ``launch/torchrun.sh`` (the product launcher) with
``--config configs/1.3b.yaml --set ...``; the ``--set`` lines are checked with the trainer's own
config loader and layout validator before anything starts (and by ``--dry-run``).

    python bench/multigpu_suite.py --dry-run                      # print the GPU commands
    python bench/multigpu_suite.py --phases tests,cp_bench --budget-s 560
    python bench/multigpu_suite.py --cpu                          # rehearsal: gloo ranks, tiny sizes

``--cpu`` runs the same plumbing on CPU ranks (gloo; 4 ranks by default, the GPU layouts): the
tiny model at 64-token sequences (256 for the CP run), a few steps, ``bench_cp.py --cpu-smoke``;
the multigpu tests are collected and skip without GPUs (~4 minutes on 2 cores). Logs go to ``--log-dir`` (default ``$OUT`` if set, else ``./multigpu_logs``):
one ``<phase>.log`` per phase and ``multigpu_summary.json`` (rewritten after every phase, so a
run cut short still leaves what it did). Checkpoints and generated model configs go to
``--work-dir`` (default ``/tmp/kla_multigpu_suite``), never under the log folder: a 1.3B
checkpoint is ~15 GB. Exit status: 0 every selected phase ok, 1 otherwise, 2 bad arguments or
a layout the trainer would reject.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PHASES = ("tests", "cp_bench", "train_dp", "train_tp", "train_cp", "resume")
TRAIN_PHASES = ("train_dp", "train_tp", "train_cp", "resume")
GPU_TEST_FILES = ("tests/test_model_gpu.py", "tests/test_cp_gpu.py")
RUN_CONFIG = "configs/1.3b.yaml"
GPU_MODEL = "configs/models/kla_1_3b.yaml"
CPU_MODEL = "configs/models/kla_tiny.yaml"
# Per-phase timeouts (s) on GPUs; a phase also never runs past --budget-s.
GPU_TIMEOUTS = {"tests": 480, "cp_bench": 480, "train_dp": 420, "train_tp": 450, "train_cp": 450, "resume": 360}
CPU_TIMEOUTS = {"tests": 300, "cp_bench": 300, "train_dp": 300, "train_tp": 300, "train_cp": 300, "resume": 300}
# The device machines keep NVLink multicast off (a program using it can take the host's GPUs out
# of service); keep the variables set for every child even if the caller's environment lost them.
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class Phase:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    """Variables added to the inherited environment (shown in the printed command)."""
    timeout_s: int = 600
    world: int = 1
    layout: str = ""
    train_args: list[str] | None = None
    """The trainer's arguments (``--config ... --set ...``) for training phases."""
    needs: str | None = None
    """A path that must exist before the phase starts (the resume phase's checkpoint)."""
    before: list[str] = field(default_factory=list)
    """Paths removed before the phase starts (a stale checkpoint folder)."""

    def shell(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + " ".join(shlex.quote(a) for a in self.argv)


# ---------------------------------------------------------------------------- the plan


def _sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def long_model_config(args) -> Path:
    """A copy of the run's model config with ``max_seq_len`` raised to ``--long-seq``.

    The model configs say 2048 (the 1.3B) or 256 (tiny); ``model=`` can only name a file, so the
    long-context run gets its own, written into ``--work-dir`` (as the tests write theirs).
    """
    src = REPO / (CPU_MODEL if args.cpu else GPU_MODEL)
    text, n = re.subn(r"^max_seq_len:.*$", f"max_seq_len: {args.long_seq}", src.read_text(), flags=re.M)
    if n != 1:
        text += f"\nmax_seq_len: {args.long_seq}\n"
    out = Path(args.work_dir) / f"{src.stem}_long{args.long_seq}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {src.relative_to(REPO)} with max_seq_len {args.long_seq} (bench/multigpu_suite.py)\n" + text)
    return out


def build_plan(args) -> list[Phase]:
    """The phases selected, in order, with their commands."""
    from kla_megatron.parallel.local_ranks import free_port

    g, py = args.gpus, sys.executable
    timeouts = CPU_TIMEOUTS if args.cpu else GPU_TIMEOUTS
    common_env = {"PYTHONPATH": str(REPO)}
    if args.cpu:
        # CPU ranks even on a GPU machine; one thread per rank (the ranks share the cores).
        common_env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", WANDB_MODE="offline")
    ckpt_tp = Path(args.work_dir) / "ckpt_tp2"
    total = args.steps + args.resume_steps
    base = {"data.kind": "mock", "train.eval_interval": 0, "logging.interval": args.log_interval,
            "train.steps": args.steps, "train.warmup_steps": max(1, args.steps // 10), "train.decay_steps": "null",
            "checkpoint.save_interval": 0}
    if args.cpu:
        base.update({"model": Path(CPU_MODEL).stem, "train.precision": "fp32", "train.seq_length": 64,
                     "train.micro_batch_size": 2, "train.global_batch_size": args.global_batch or 4 * g})
    else:
        base["train.global_batch_size"] = args.global_batch or 64

    def train(name, layout, sets, needs=None, before=()):
        sets = {**base, "run_name": f"multigpu_{name}", **sets}
        train_args = ["--config", RUN_CONFIG, *_sets(*(f"{k}={v}" for k, v in sets.items()))]
        env = {**common_env, "GPUS_PER_NODE": str(g), "MASTER_PORT": str(free_port()),
               "TORCHRUN": f"{py} launch/torchrun_agent.py"}  # this interpreter
        return Phase(name, ["bash", "launch/torchrun.sh", *train_args], env, timeouts[name], g, layout,
                     train_args, needs, list(before))

    phases = []
    if "tests" in args.phases:
        argv = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "multigpu", *GPU_TEST_FILES]
        phases.append(Phase("tests", argv, dict(common_env), timeouts["tests"], g, "pytest -m multigpu"))
    if "cp_bench" in args.phases:
        cps = [str(c) for c in (1, 2, 4, 8) if c <= g]
        argv = [py, "bench/bench_cp.py", "--cp", *cps, "--json-out", str(Path(args.log_dir) / "bench_cp.json")]
        if args.cpu:
            argv.insert(2, "--cpu-smoke")
        phases.append(Phase("cp_bench", argv, dict(common_env), timeouts["cp_bench"], g, "CP " + "/".join(cps)))
    if "train_dp" in args.phases:
        phases.append(train("train_dp", f"DP={g}", {"parallel.tensor": 1, "parallel.context": 1, "parallel.data": g,
                                                   "checkpoint.dir": "null"}))
    if "train_tp" in args.phases:
        if g % 2:
            raise ValueError(f"train_tp needs an even --gpus (TP=2), got {g}")
        phases.append(train("train_tp", f"TP=2 x DP={g // 2}",
                            {"parallel.tensor": 2, "parallel.context": 1, "parallel.data": g // 2,
                             "train.steps": total, "train.exit_at_step": args.steps, "checkpoint.dir": ckpt_tp,
                             "checkpoint.resume": "none", "checkpoint.keep_last": 1}, before=[str(ckpt_tp)]))
    if "train_cp" in args.phases:
        phases.append(train("train_cp", f"CP={g}, {args.long_seq} tokens",
                            {"parallel.tensor": 1, "parallel.context": g, "parallel.data": 1,
                             "model": long_model_config(args), "train.seq_length": args.long_seq,
                             "train.micro_batch_size": 1, "train.global_batch_size": args.long_global_batch,
                             "train.recompute": "full", "checkpoint.dir": "null"}))
    if "resume" in args.phases:
        ckpt = ckpt_tp / f"iter_{args.steps:07d}"
        phases.append(train("resume", f"TP=2xDP={g // 2} -> DP={g}",
                            {"parallel.tensor": 1, "parallel.context": 1, "parallel.data": g, "train.steps": total,
                             "checkpoint.dir": "null", "checkpoint.resume": ckpt}, needs=str(ckpt)))
    return phases


def check_plan(phases: list[Phase]) -> None:
    """Load every training phase's config with the trainer's loader and check its layout against
    the world size (what kla-launch does); raises ValueError with the trainer's message."""
    from kla_megatron.training.config import load_run_config

    for ph in phases:
        if ph.train_args is None:
            continue
        config = ph.train_args[1]
        overrides = [ph.train_args[i + 1] for i, a in enumerate(ph.train_args) if a == "--set"]
        try:
            cfg = load_run_config(str(REPO / config), overrides)
            cfg.validate_world(ph.world)
            if cfg.train.exit_at_step is not None and cfg.train.exit_at_step % cfg.logging.interval:
                raise ValueError(f"--steps {cfg.train.exit_at_step} is not a multiple of --log-interval "
                                 f"{cfg.logging.interval}: the last step would not be logged")
        except ValueError as exc:
            raise ValueError(f"phase {ph.name}: {exc}") from None


# ---------------------------------------------------------------------------- parsing logs

STEP_RE = re.compile(
    r"^step (\d+)/(\d+) \| loss ([-0-9.naninf]+) \| .*?tokens/s (\d+) \| TFLOP/s/device ([0-9.e+-]+)"
    r"(?: \| MFU ([0-9.]+)%)? \| mem ([0-9.]+)GiB", re.M)
PYTEST_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)")
CP_ROW_RE = re.compile(r"^(weak|strong)\s+\d+\s+\d+\s+\d+\s+[0-9.]+.*$", re.M)


def parse_train(text: str, world: int) -> dict:
    lines = [m.groups() for m in STEP_RE.finditer(text)]
    out: dict = {"log_lines": len(lines)}
    if lines:
        steps = [int(x[0]) for x in lines]
        tok = [float(x[3]) for x in lines]
        tfl = [float(x[4]) for x in lines]
        mfu = [float(x[5]) for x in lines if x[5] is not None]
        # Steady state: the log intervals after the first (which holds compilation and warm-up).
        steady = slice(1, None) if len(lines) > 1 else slice(0, None)
        mean = lambda v: sum(v) / len(v) if v else None  # noqa: E731
        out.update(first_step=steps[0], last_step=steps[-1], total_steps=int(lines[-1][1]),
                   loss_first=float(lines[0][2]), loss_last=float(lines[-1][2]),
                   tokens_per_s=mean(tok[steady]), tokens_per_s_per_gpu=mean(tok[steady]) / world,
                   tflops_per_device=mean(tfl[steady]), mfu_pct=mean(mfu[steady] if len(mfu) > 1 else mfu),
                   mem_gib=max(float(x[6]) for x in lines), steady_intervals=len(tok[steady]))
    # Other ranks' warnings can land on the same line (one pipe): keep only the trainer's text.
    m = re.search(r"^resumed from (\S+) at step (\d+)( \(layout .*?; RNG re-seeded\))?", text, re.M)
    if m:
        out.update(resumed_from=m[1], resumed_step=int(m[2]), resume_note=(m[3] or "").strip())
    saved = re.findall(r"^saved checkpoint (\S+)", text, re.M)
    if saved:
        out["saved_checkpoint"] = saved[-1]
    return out


def parse_pytest(text: str) -> dict:
    tail = [ln for ln in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|no tests ran)\b", ln)]
    counts: dict = {}
    if tail:
        for n, kind in PYTEST_RE.findall(tail[-1]):
            kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
            counts[kind] = int(n)
    counts["failed_tests"] = re.findall(r"^FAILED (\S+)", text, re.M)
    return counts


def parse_cp_bench(text: str, json_path: Path) -> dict:
    out = {"rows": [m.group(0).rstrip() for m in CP_ROW_RE.finditer(text)]}
    try:
        data = json.loads(json_path.read_text())
        out["device"] = data.get("device")
        out["table"] = [{k: r.get(k) for k in ("mode", "cp", "tokens_per_gpu", "layer_ms", "us_per_token",
                                               "overhead", "comm_ms", "comm_fraction", "bytes_per_rank")}
                        for r in data.get("rows", [])]
    except (OSError, ValueError):
        pass
    return out


def judge(ph: Phase, rc: int | None, parsed: dict, cpu: bool) -> str:
    """ok / FAIL (with the reason) / timeout."""
    if rc is None:
        return "timeout"
    if rc != 0:
        return f"FAIL (rc {rc})"
    if ph.name == "tests":
        if parsed.get("failed") or parsed.get("errors"):
            return "FAIL (tests failed)"
        if cpu:  # the multigpu tests skip without GPUs: the rehearsal checks that they are collected
            return "ok" if parsed.get("passed") or parsed.get("skipped") else "FAIL (no tests collected)"
        if not parsed.get("passed"):
            return "FAIL (no test passed)"
        return f"ok ({parsed['skipped']} skipped)" if parsed.get("skipped") else "ok"
    if ph.name == "cp_bench":
        return "ok" if parsed.get("rows") else "FAIL (no table rows)"
    if not parsed.get("log_lines"):
        return "FAIL (no step lines)"
    sets = dict(a.split("=", 1) for a in ph.train_args if "=" in a)
    want = int(sets.get("train.exit_at_step", sets["train.steps"]))
    if parsed["last_step"] != want:
        return f"FAIL (stopped at step {parsed['last_step']}, expected {want})"
    if ph.name == "resume" and "resumed_step" not in parsed:
        return "FAIL (no 'resumed from' line)"
    if ph.name == "train_tp" and "saved_checkpoint" not in parsed:
        return "FAIL (no checkpoint saved)"
    return "ok"


def key_numbers(name: str, p: dict) -> str:
    if name == "tests":
        s = ", ".join(f"{p[k]} {k}" for k in ("passed", "failed", "errors", "skipped", "deselected") if p.get(k))
        return s or "-"
    if name == "cp_bench":
        return f"{len(p.get('rows', []))} rows (table below)"
    if not p.get("log_lines"):
        return "-"
    parts = [f"steps {p['first_step']}..{p['last_step']}", f"loss {p['loss_first']:.3f}->{p['loss_last']:.3f}",
             f"tok/s/GPU {p['tokens_per_s_per_gpu']:.0f}", f"TFLOP/s/dev {p['tflops_per_device']:.3g}"]
    if p.get("mfu_pct") is not None:
        parts.append(f"MFU {p['mfu_pct']:.1f}%")
    parts.append(f"mem {p['mem_gib']:.2f}GiB")
    if "resumed_step" in p:
        parts.append(f"resumed@{p['resumed_step']}")
    if "saved_checkpoint" in p:
        parts.append("saved " + Path(p["saved_checkpoint"]).name)
    return " | ".join(parts)


# ---------------------------------------------------------------------------- running


def run_phase(ph: Phase, log_path: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run one phase in its own process group, teeing its output; None = killed by the timeout."""
    env = {**os.environ, **NO_MULTICAST, **ph.env}
    t0 = time.time()
    with open(log_path, "w") as log:
        log.write(f"$ {ph.shell()}\n")
        log.flush()
        proc = subprocess.Popen(ph.argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True, text=True, errors="replace", bufsize=1)

        def tee():
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(f"[{ph.name}] {line}")
                sys.stdout.flush()

        reader = threading.Thread(target=tee, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
            msg = f"[multigpu_suite] {ph.name}: timeout after {timeout_s:.0f} s, stopping its process group\n"
            log.write(msg)
            sys.stdout.write(msg)
            for sig, grace in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the phase's own group: torchrun and its workers
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
        reader.join(timeout=10)
    return rc, time.time() - t0


def preflight(args) -> dict:
    """Versions and device count, in a child (the driver itself imports no torch)."""
    code = ("import json, platform, torch, psutil, megatron.core as mc; "
            "n = torch.cuda.device_count(); "
            "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__, "
            "'megatron_core': getattr(mc, '__version__', '?'), "
            "'cuda_devices': [torch.cuda.get_device_name(i) for i in range(n)], "
            "'triton': __import__('triton').__version__ if n else None}))")
    env = {**os.environ, **NO_MULTICAST, "PYTHONPATH": str(REPO)}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode:
        raise RuntimeError("preflight failed (on the GPU machine: is megatron-core installed? "
                           "`python3 -m pip install --no-deps .whl/megatron_core-*.whl`, with carry ['.whl']):\n"
                           + proc.stderr[-2000:])
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    if not args.cpu and len(info["cuda_devices"]) < args.gpus:
        raise RuntimeError(f"--gpus {args.gpus} but torch sees {len(info['cuda_devices'])} CUDA device(s) "
                           f"(use --gpus N, or --cpu for the CPU rehearsal)")
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                            text=True).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    info["host"] = socket.gethostname()
    return info


def summary_table(results: list[dict]) -> str:
    head = f"{'phase':9} {'layout':22} {'status':28} {'rc':>4} {'wall s':>7}  key numbers"
    lines = [head]
    for r in results:
        rc = "-" if r["rc"] is None else str(r["rc"])
        lines.append(f"{r['phase']:9} {r['layout'][:22]:22} {r['status'][:28]:28} {rc:>4} {r['wall_s']:>7.1f}  "
                     f"{key_numbers(r['phase'], r['parsed'])}")
    for r in results:
        if r["phase"] == "cp_bench" and r["parsed"].get("rows"):
            lines += ["", "bench_cp rows (mode, CP, tok/GPU, global, layer ms, us/tok, overhead, comm ms, comm %, "
                          "KiB/rank):", *r["parsed"]["rows"]]
    lines += ["", "commands:"] + [f"  {r['phase']}: {r['command']}" for r in results]
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="multigpu_suite", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    ap.add_argument("--gpus", type=int, default=None, help="processes / GPUs (default 4; --cpu: 4 ranks, the GPU layouts)")
    ap.add_argument("--steps", type=int, default=None,
                    help="training steps of train_dp/train_tp/train_cp (default 30; --cpu: 4)")
    ap.add_argument("--resume-steps", type=int, default=None, help="steps after the resume (default 10; --cpu: 2)")
    ap.add_argument("--log-interval", type=int, default=None, help="trainer log interval (default 5; --cpu: 2)")
    ap.add_argument("--global-batch", type=int, default=None,
                    help="global batch (sequences) of train_dp/tp/resume (default 64 x 2048 tokens; --cpu: 4 x GPUs)")
    ap.add_argument("--long-seq", type=int, default=None, help="train_cp sequence length (default 65536; --cpu: 256)")
    ap.add_argument("--long-global-batch", type=int, default=2, help="train_cp global batch in sequences (default 2)")
    ap.add_argument("--cpu", action="store_true", help="rehearsal on CPU ranks (gloo) at tiny sizes")
    ap.add_argument("--dry-run", action="store_true", help="check the configs and print the commands only")
    ap.add_argument("--log-dir", default=None, help="default $OUT if set, else ./multigpu_logs")
    ap.add_argument("--work-dir", default="/tmp/kla_multigpu_suite",
                    help="checkpoints and generated model configs (kept out of the log folder)")
    ap.add_argument("--timeout-s", type=int, default=None, help="per-phase timeout (default: per phase, 360-480 s)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock budget for the whole invocation: no phase runs past it (fit a command limit)")
    args = ap.parse_args(argv)
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in args.phases if p not in PHASES]
    if bad or not args.phases:
        ap.error(f"--phases: unknown {bad}; choose from {','.join(PHASES)}")
    cpu = args.cpu
    for name, gpu, cpu_value in (("gpus", 4, 4), ("steps", 30, 4), ("resume_steps", 10, 2), ("log_interval", 5, 2),
                                 ("long_seq", 65536, 256)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_value if cpu else gpu)
    if args.log_dir is None:
        args.log_dir = os.environ.get("OUT") or "multigpu_logs"
    args.log_dir = str(Path(args.log_dir).resolve())
    args.work_dir = str(Path(args.work_dir).resolve())
    if Path(args.work_dir).is_relative_to(args.log_dir) and not args.dry_run:
        ap.error("--work-dir must not be inside --log-dir (checkpoints would be copied back with the logs)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        phases = build_plan(args)
        check_plan(phases)
    except ValueError as exc:
        print(f"multigpu_suite: error: {exc}", file=sys.stderr)
        return 2
    mode = "cpu (gloo)" if args.cpu else "gpu (nccl)"
    print(f"multigpu_suite: {mode}, {args.gpus} processes, phases {','.join(p.name for p in phases)}; "
          f"logs {args.log_dir}; work {args.work_dir}")
    if args.dry_run:
        for ph in phases:
            print(f"[{ph.name}] ({ph.layout}; timeout {args.timeout_s or ph.timeout_s} s)\n  {ph.shell()}")
        return 0
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    try:
        env_info = preflight(args)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"multigpu_suite: {exc}", file=sys.stderr)
        return 2
    print(f"multigpu_suite: {json.dumps(env_info)}")
    report = {"date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
              "mode": mode, "gpus": args.gpus, "env": env_info, "args": vars(args), "phases": []}
    summary_path = log_dir / "multigpu_summary.json"
    for ph in phases:
        result = {"phase": ph.name, "layout": ph.layout, "command": ph.shell(), "rc": None, "wall_s": 0.0,
                  "log": str(log_dir / f"{ph.name}.log"), "parsed": {}}
        timeout = args.timeout_s or ph.timeout_s
        if args.budget_s is not None:
            # 45 s of margin: a timed-out phase gets 30 s after SIGTERM (the trainer checkpoints
            # on it) and 10 s after SIGKILL, and the summary still has to be written.
            timeout = min(timeout, args.budget_s - (time.time() - start) - 45)
        if args.budget_s is not None and timeout < 30:
            result["status"] = "not run (budget spent)"
        elif ph.needs and not Path(ph.needs).exists():
            result["status"] = "not run (no checkpoint: run train_tp first, same --work-dir/--steps)"
        else:
            for path in ph.before:
                shutil.rmtree(path, ignore_errors=True)
            print(f"\n===== {ph.name} ({ph.layout}; timeout {timeout:.0f} s)\n$ {ph.shell()}", flush=True)
            rc, wall = run_phase(ph, Path(result["log"]), timeout)
            text = Path(result["log"]).read_text(errors="replace")
            if ph.name == "tests":
                parsed = parse_pytest(text)
            elif ph.name == "cp_bench":
                parsed = parse_cp_bench(text, log_dir / "bench_cp.json")
            else:
                parsed = parse_train(text, ph.world)
            result.update(rc=rc, wall_s=round(wall, 1), parsed=parsed, status=judge(ph, rc, parsed, args.cpu))
        report["phases"].append(result)
        summary_path.write_text(json.dumps(report, indent=1))
    table = summary_table(report["phases"])
    print(f"\n===== summary ({mode}, {args.gpus} processes, {env_info.get('cuda_devices') or 'no GPU'}, "
          f"torch {env_info['torch']}, megatron-core {env_info['megatron_core']}, commit {env_info['git_commit']})")
    print(table)
    print(f"\nsummary JSON: {summary_path}")
    (log_dir / "multigpu_summary.txt").write_text(table + "\n")
    return 0 if all(r["status"].startswith("ok") for r in report["phases"]) else 1


if __name__ == "__main__":
    sys.exit(main())
