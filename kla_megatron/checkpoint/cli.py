"""``kla-convert``: checkpoint conversions (examples in kla_megatron/checkpoint/README.md).

    kla-convert megatron-to-hf  SRC OUT [--model-config NAME|YAML] [--tokenizer TOK] [--dtype D]
    kla-convert hf-to-megatron  SRC OUT [--tp N] [--pp N]
    kla-convert reshard         SRC OUT --tp N --pp N [--model-config NAME|YAML]
    kla-convert reference-to-hf SRC OUT [--tokenizer TOK]          (reference kla SequenceModel, H = 1)
    kla-convert reference-to-megatron SRC OUT [--tp N] [--pp N]
    kla-convert verify-hf       MEGATRON_SRC HF_DIR [--model-config ...]

``--verify`` (any conversion) reloads what was written, runs it and the source on the same
random tokens and prints the max |logit difference| and KL; exit status 1 above ``--tol``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}  # torch dtype names


def _dtype(name: str):
    import torch  # imported late: --help answers without loading torch

    return getattr(torch, DTYPES[name])


def _model_config(args, ckpt_dir: Path):
    from kla_megatron.models import load_model_config, read_stored_model_config

    from .megatron_io import adapt_vocab, checkpoint_shapes, find_model_config

    if args.model_config:
        cfg = load_model_config(args.model_config)
    else:
        found = find_model_config(ckpt_dir)
        if found is None:
            raise ValueError(f"no model_config.yaml next to {ckpt_dir}: pass --model-config NAME_OR_YAML")
        cfg = read_stored_model_config(found)
    return adapt_vocab(cfg, checkpoint_shapes(ckpt_dir))


def _report(name: str, result: dict, tol: float) -> int:
    print(json.dumps({"verify": name, **result, "tol": tol}, indent=1))
    if not result["max_abs_logit_diff"] <= tol:
        print(f"kla-convert: VERIFY FAILED: max |logit diff| {result['max_abs_logit_diff']:.3e} > tol {tol:.1e}",
              file=sys.stderr)
        return 1
    return 0


def _hf_from_dir(path):
    from .hf_io import hf_model, load_hf

    config, state = load_hf(path)
    return config, hf_model(config, state)


def megatron_to_hf(args) -> int:
    from . import hf_io, verify
    from .megatron_io import find_dist_checkpoint, load_megatron_state
    from .names import hf_config_dict, megatron_to_hf as rename

    src = find_dist_checkpoint(args.src)
    cfg = _model_config(args, src)
    state = rename(load_megatron_state(src, cfg), cfg.layer_pattern)
    hf_io.export_hf(state, hf_io.make_config(hf_config_dict(cfg)), args.out, tokenizer_model=args.tokenizer,
                    dtype=_dtype(args.dtype))
    print(f"kla-convert: wrote {args.out}")
    if args.verify:
        tokens = verify.random_tokens(cfg.vocab_size)
        _, model = _hf_from_dir(args.out)
        return _report("megatron vs hf", verify.compare(verify.megatron_logits(src, cfg, tokens),
                                                        verify.hf_logits(model, tokens)), args.tol)
    return 0


def hf_to_megatron(args) -> int:
    from . import verify
    from .hf_io import hf_model, load_hf
    from .megatron_io import save_megatron
    from .names import hf_to_megatron as rename, model_config_from_hf

    config, state = load_hf(args.src)
    cfg = model_config_from_hf(config)
    out = save_megatron(rename(state, cfg.layer_pattern), cfg, args.out, args.tp, args.pp)
    print(f"kla-convert: wrote {out} (TP={args.tp}, PP={args.pp})")
    if args.verify:
        tokens = verify.random_tokens(cfg.vocab_size)
        return _report("hf vs megatron", verify.compare(verify.hf_logits(hf_model(config, state), tokens),
                                                        verify.megatron_logits(out / "model", cfg, tokens)), args.tol)
    return 0


def reshard(args) -> int:
    from . import verify
    from .megatron_io import find_dist_checkpoint, reshard as run_reshard

    src = find_dist_checkpoint(args.src)
    cfg = _model_config(args, src)
    out = run_reshard(src, cfg, args.out, args.tp, args.pp)
    print(f"kla-convert: wrote {out} (TP={args.tp}, PP={args.pp})")
    if args.verify:
        tokens = verify.random_tokens(cfg.vocab_size)
        return _report("megatron vs resharded", verify.compare(verify.megatron_logits(src, cfg, tokens),
                                                               verify.megatron_logits(out / "model", cfg, tokens)),
                       args.tol)
    return 0


def _reference(args):
    from .reference import from_reference, read_reference_state

    return from_reference(read_reference_state(args.src), norm_eps=args.norm_eps)


def _verify_reference(args, cfg, logits_of) -> int:
    """Against the reference's own logits when the file has them (golden .npz), else against
    our model built directly from the mapped weights."""
    from . import verify

    if Path(args.src).suffix == ".npz":
        import numpy as np

        data = np.load(args.src)
        if "tokens" in data.files and "logits" in data.files:
            import torch

            tokens = torch.from_numpy(np.array(data["tokens"]))
            return _report("reference logits vs converted", verify.compare(
                torch.from_numpy(np.array(data["logits"])).float(), logits_of(tokens)), args.tol)
    _, state = _reference(args)
    tokens = verify.random_tokens(cfg.vocab_size)
    return _report("mapped reference vs converted",
                   verify.compare(verify.megatron_logits(state, cfg, tokens), logits_of(tokens)), args.tol)


def reference_to_hf(args) -> int:
    from . import hf_io, verify
    from .names import hf_config_dict, megatron_to_hf as rename

    cfg, state = _reference(args)
    hf_io.export_hf(rename({k: v.float() for k, v in state.items()}, cfg.layer_pattern),
                    hf_io.make_config(hf_config_dict(cfg)), args.out, tokenizer_model=args.tokenizer,
                    dtype=_dtype(args.dtype))
    print(f"kla-convert: wrote {args.out}")
    if args.verify:
        _, model = _hf_from_dir(args.out)
        return _verify_reference(args, cfg, lambda tokens: verify.hf_logits(model, tokens))
    return 0


def reference_to_megatron(args) -> int:
    from . import verify
    from .megatron_io import save_megatron

    cfg, state = _reference(args)
    out = save_megatron({k: v.float() for k, v in state.items()}, cfg, args.out, args.tp, args.pp)
    print(f"kla-convert: wrote {out} (TP={args.tp}, PP={args.pp})")
    if args.verify:
        return _verify_reference(args, cfg, lambda tokens: verify.megatron_logits(out / "model", cfg, tokens))
    return 0


def verify_hf(args) -> int:
    from . import verify
    from .megatron_io import find_dist_checkpoint

    src = find_dist_checkpoint(args.src)
    cfg = _model_config(args, src)
    from .names import check_same_architecture, model_config_from_hf

    config, model = _hf_from_dir(args.out)
    check_same_architecture(cfg, model_config_from_hf(config), "megatron checkpoint vs HF directory")
    tokens = verify.random_tokens(cfg.vocab_size)
    return _report("megatron vs hf", verify.compare(verify.megatron_logits(src, cfg, tokens),
                                                    verify.hf_logits(model, tokens)), args.tol)


COMMANDS = {"megatron-to-hf": megatron_to_hf, "hf-to-megatron": hf_to_megatron, "reshard": reshard,
            "reference-to-hf": reference_to_hf, "reference-to-megatron": reference_to_megatron,
            "verify-hf": verify_hf}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kla-convert", description=__doc__.split("\n\n")[0].replace("``", "`"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=sorted(COMMANDS))
    p.add_argument("src", help="source checkpoint (megatron run/iter/model dir, HF dir, or reference file)")
    p.add_argument("out", help="output directory (for verify-hf: the HF directory to check)")
    p.add_argument("--model-config", help="KLAModelConfig name or YAML for megatron sources "
                                          "(default: model_config.yaml next to the checkpoint)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the written megatron checkpoint")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the written megatron checkpoint")
    p.add_argument("--tokenizer", help="the training tokenizer (sentencepiece .model, tokenizer.json or its folder, "
                                       "tiktoken rank file), exported as a transformers tokenizer")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of exported HF tensors")
    p.add_argument("--norm-eps", type=float, default=1e-5, help="reference model's norm eps (not in its weights)")
    p.add_argument("--verify", action="store_true", help="run source and result on the same tokens afterwards")
    p.add_argument("--tol", type=float, default=1e-4, help="max |logit diff| accepted by --verify")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        raise SystemExit("kla-convert: --tp and --pp must be ≥ 1")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError, KeyError) as exc:
        print(f"kla-convert: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
