"""Pretraining entry point.

    python -m kla_megatron.train --config configs/tiny_cpu.yaml [--set train.lr=3e-4 ...]
    torchrun --nproc-per-node 8 -m kla_megatron.train --config configs/125m.yaml
    kla-pretrain --config configs/1.3b.yaml --set parallel.tensor=2

``--set KEY=VALUE`` overrides any config field (the value is parsed as YAML); ``--dry-run``
validates the config and prints it without training. Exit status: 0 done, already complete or
preempted (checkpoint written), 1 non-finite loss under the abort policy (or a crash), 2 bad
config/data, 3 no loadable checkpoint, 4 disk full while saving, 5 checkpoint.dir in use by
another run (the table: launch/README.md).
"""
from __future__ import annotations

import argparse
import sys
import warnings

import yaml


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="kla-pretrain", description=__doc__.split("\n\n")[0].replace("``", "`"))
    ap.add_argument("--config", required=True, help="run config: a configs/<name>.yaml path or a name in configs/")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config field, e.g. --set train.lr=3e-4 (repeatable)")
    ap.add_argument("--dry-run", action="store_true", help="validate and print the config, then exit")
    return ap.parse_args(argv)


def run(argv=None):
    """Train; returns the History (used by tests). Raises ValueError for bad configs."""
    from kla_megatron.training.config import load_run_config

    args = parse_args(argv)
    cfg = load_run_config(args.config, args.overrides)
    if args.dry_run:
        from kla_megatron.training.model_factory import model_config

        model_config(cfg)  # the model's fit with the run is checked too
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return None
    from kla_megatron.checkpoint import directory as ckpt
    from kla_megatron.training.trainer import Trainer, init_distributed

    # One run per checkpoint directory, held from before the model is built until close().
    init_distributed()
    lock = ckpt.RunLock.acquire(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
    try:
        trainer = Trainer(cfg)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    trainer.lock = lock
    try:
        history = trainer.train()
    except BaseException:
        trainer.close(barrier=False)  # other ranks may be gone: do not wait for them
        raise
    trainer.close()
    return history


def _notices_as_lines(category) -> None:
    """Print our own notices (``category``) as one plain line each, not as a Python warning."""
    show = warnings.showwarning

    def showwarning(message, cat, filename, lineno, file=None, line=None):
        if issubclass(cat, category):
            print(f"kla-pretrain: {message}", flush=True)
        else:
            show(message, cat, filename, lineno, file, line)

    warnings.showwarning = showwarning


# Library notices that are expected on a supported setup and say nothing a user can act on.
HARMLESS_WARNINGS = [
    ".*Transformer Engine and Apex are not installed.*",  # megatron-core's fallbacks (CPU, plain pip)
    "Apex is not installed.*",
    "full scope is deprecated.*",  # megatron-core's own TransformerConfig default
    "The .grad attribute of a Tensor that is not a leaf Tensor.*",  # megatron-core's DDP hook probe
    ".*`load_state_dict` is deprecated.*",  # inside megatron-core's dist_checkpointing loader
    r".*`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated.*",
]


def _quiet_libraries() -> None:
    import logging

    for pattern in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # "Unable to save MockGPTDataset indexes because path_to_cache is None", once per split
    logging.getLogger("megatron.core.datasets.gpt_dataset").addFilter(lambda r: "path_to_cache is None" not in r.getMessage())


def main(argv=None) -> int:
    _quiet_libraries()
    parse_args(argv)  # --help and usage errors answer before torch and megatron-core are imported
    from kla_megatron.checkpoint.directory import CheckpointError, CheckpointWarning
    from kla_megatron.training.trainer import NonFiniteError

    _notices_as_lines(CheckpointWarning)
    try:
        run(argv)
    except CheckpointError as exc:  # no loadable checkpoint, disk full, directory in use: one line
        print(f"kla-pretrain: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except ValueError as exc:  # bad config, data or checkpoint: a message, not a traceback
        print(f"kla-pretrain: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteError as exc:
        print(f"kla-pretrain: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
