"""kla-eval: score a checkpoint on lm-evaluation-harness tasks.

    kla-eval CHECKPOINT --tasks lambada_openai,hellaswag --output DIR [--batch-size 8] [--device cuda]
    kla-eval runs/x/checkpoints --iteration 200 --config configs/x.yaml --tasks T --output DIR
    kla-eval hf/x --tasks kla_mc,kla_lambada --include-path tests/data/eval_tasks --output DIR

CHECKPOINT is a trainer checkpoint directory (its newest complete iteration, or --iteration N),
a Hugging Face export (kla-convert megatron-to-hf) or the paper's reference weights (.pt/.pth/
.safetensors/.npz). Writes DIR/results.json (lm-eval's results and ours under "kla_eval") and
DIR/results.md (task, metric, value, stderr). Exit status 2 on bad input (one line).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
import time
from pathlib import Path

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _limit(text: str):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value if value < 1 else int(value)  # a fraction of each task below 1, else a count (as lm-eval)


def _names(text: str):
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no task names")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kla-eval", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="trainer checkpoint dir, HF export dir or reference weights file")
    p.add_argument("--tasks", required=True, type=_names, help="comma-separated lm-eval task or group names")
    p.add_argument("--output", required=True, help="directory for results.json / results.md")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="also read task YAML files from DIR (repeatable), as lm_eval's --include_path")
    p.add_argument("--iteration", type=int, help="trainer checkpoints: score iter_N instead of the newest")
    p.add_argument("--tokenizer", help="tokenizer file (as the run's data.tokenizer); default: the HF export's own")
    p.add_argument("--config", help="the run's config (name or YAML): its data.tokenizer is the tokenizer")
    p.add_argument("--model-config", help="trainer checkpoints: KLAModelConfig name or YAML "
                                          "(default: model_config.yaml saved with the checkpoint)")
    p.add_argument("--norm-eps", type=float, default=1e-5, help="reference weights: the norm eps (not stored)")
    p.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="weights and activations")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples (default: the task's own, mostly 0)")
    p.add_argument("--limit", type=_limit, help="at most this many examples per task (a fraction if < 1)")
    p.add_argument("--max-length", type=int, help="longest input in tokens (default: the model's max_seq_len)")
    p.add_argument("--max-gen-toks", type=int, default=256, help="generation tasks: new tokens at most")
    p.add_argument("--bootstrap-iters", type=int, default=100000, help="bootstrap resamples for stderrs "
                                                                         "lm-eval does not compute in closed form")
    p.add_argument("--seed", type=int, default=1234, help="lm-eval's random, numpy, torch and few-shot seeds")
    p.add_argument("--log-samples", action="store_true", help="also write each example's requests and scores "
                                                              "(DIR/samples_<task>.jsonl)")
    p.add_argument("--verbose", action="store_true", help="lm-eval's progress messages")
    return p


def task_manager(names, include_paths):
    """lm-eval's TaskManager knowing ``names``; the built-in task index (seconds to build) only
    when the include paths do not define them all."""
    from lm_eval.tasks import TaskManager

    for path in include_paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"--include-path {path} is not a directory")
    manager = TaskManager(include_path=list(include_paths), include_defaults=False) if include_paths else None
    if manager is None or any(not manager.match_tasks([n]) for n in names):
        manager = TaskManager(include_path=list(include_paths) or None)
    unknown = [n for n in names if not manager.match_tasks([n])]
    if unknown:
        hints = {n: difflib.get_close_matches(n, manager.all_tasks, n=3) for n in unknown}
        said = "; ".join(f"{n!r}" + (f" (did you mean {', '.join(h)}?)" if h else "") for n, h in hints.items())
        raise ValueError(f"unknown task {said}; tasks from local YAML files need --include-path DIR")
    return manager


def expand(manager, names):
    """Task names with glob patterns (``arc_*``) expanded, in the order given, each once."""
    found = [match for name in names for match in manager.match_tasks([name])]
    return list(dict.fromkeys(found))


def _device(name):
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here (use --device cpu)")
    return name


def check_output(out: Path) -> None:
    """ValueError now, not after the evaluation, when ``out`` cannot become the results directory."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a directory")
    existing = next(p for p in (out, *out.resolve().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--output {out}: cannot create or write files in {existing}")


def evaluate(args) -> dict:
    from . import loading

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {args.batch_size}")
    loading.source_kind(Path(args.checkpoint))  # a wrong path fails before lm-eval and its task index load
    check_output(Path(args.output))
    import torch
    from lm_eval import simple_evaluate

    from . import report
    from .lm import KLAEvalLM

    device = _device(args.device)
    manager = task_manager(args.tasks, args.include_path)
    args.tasks = expand(manager, args.tasks)
    loaded = loading.load(args.checkpoint, iteration=args.iteration, tokenizer=args.tokenizer,
                          run_config=args.config, model_config=args.model_config, norm_eps=args.norm_eps)
    lm = KLAEvalLM(loaded.model, loaded.tokenizer, batch_size=args.batch_size, device=device,
                   dtype=getattr(torch, DTYPES[args.dtype]), max_length=args.max_length,
                   max_gen_toks=args.max_gen_toks)
    start = time.time()
    results = simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                              task_manager=manager, log_samples=args.log_samples,
                              bootstrap_iters=args.bootstrap_iters, random_seed=args.seed,
                              numpy_random_seed=args.seed, torch_random_seed=args.seed,
                              fewshot_random_seed=args.seed)
    import kla_megatron
    import lm_eval

    meta = {"checkpoint": str(Path(args.checkpoint).resolve()), "kind": loaded.kind, "read": str(loaded.path),
            "iteration": loaded.iteration, "tasks": args.tasks, "include_path": args.include_path,
            "batch_size": args.batch_size, "device": device, "dtype": args.dtype, "num_fewshot": args.num_fewshot,
            "limit": args.limit, "max_length": lm.max_length, "tokenizer": loaded.tokenizer.source,
            "seconds": round(time.time() - start, 3), "kla_megatron": kla_megatron.__version__,
            "lm_eval": lm_eval.__version__}
    written = report.write(args.output, results, meta, samples=args.log_samples)
    print(written["markdown"].read_text(), end="")
    print(f"kla-eval: wrote {written['json']} and {written['markdown']}")
    return results


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _quiet(verbose: bool) -> None:
    """megatron-core's expected fallbacks (as kla-pretrain); lm-eval and transformers progress
    notices unless --verbose."""
    import warnings

    from kla_megatron.train import HARMLESS_WARNINGS

    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    if not verbose:
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # read when transformers is imported
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    _quiet(args.verbose)
    try:
        evaluate(args)
    except (ValueError, FileNotFoundError, KeyError, NotADirectoryError) as exc:
        print(f"kla-eval: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
