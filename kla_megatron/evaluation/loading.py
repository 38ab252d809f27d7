"""The checkpoint to score, as the Hugging Face ``KLAForCausalLM`` plus its tokenizer.

Three kinds of source, read with the loaders ``kla-convert`` uses:

- ``trainer``: a run's checkpoint directory (its newest complete ``iter_*``, or ``iteration``),
  an ``iter_*`` directory or its ``model/``; the weights are merged to TP = PP = 1 and renamed to
  the HF model in memory (the tensors ``kla-convert megatron-to-hf`` writes, so an fp32 export
  scores the same);
- ``hf``: a directory written by ``kla-convert megatron-to-hf`` / ``reference-to-hf``;
- ``reference``: the paper's reference weights (``.pt``/``.pth``/``.safetensors``/``.npz``).

The tokenizer is the export's own (``AutoTokenizer``, a standard transformers class) for HF
directories, else the file named by ``--tokenizer`` or by the run config's ``data.tokenizer``,
through the trainer's ``load_tokenizer``. Either way: plain ids, no BOS/EOS added, EOS is the
end-of-text token lm-eval puts before an empty context.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import List, Optional

import torch

REFERENCE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
_ITER_RE = re.compile(r"^iter_(\d{7})$")


@dataclasses.dataclass
class Tokenizer:
    """What scoring needs of a tokenizer: text ↔ ids (no special tokens added) and EOS."""

    encode_fn: object
    decode_fn: object
    eos_id: int
    vocab_size: int
    source: str

    def encode(self, text: str) -> List[int]:
        return list(self.encode_fn(text))

    def decode(self, ids) -> str:
        return self.decode_fn([int(i) for i in ids])


@dataclasses.dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: Tokenizer
    kind: str  # trainer | hf | reference
    path: Path  # what was read: the dist checkpoint dir, the HF dir or the reference file
    iteration: Optional[int]


def source_kind(path: Path) -> str:
    """'trainer' | 'hf' | 'reference' for a checkpoint path; ValueError/FileNotFoundError otherwise."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return "hf" if (path / "config.json").exists() else "trainer"
    if path.suffix in REFERENCE_SUFFIXES:
        return "reference"
    raise ValueError(f"checkpoint {path} is a file but not reference weights ({'/'.join(REFERENCE_SUFFIXES)}); "
                     "give a trainer checkpoint directory or a Hugging Face export directory")


def trainer_dir(path: Path, iteration: Optional[int]) -> Path:
    """The torch_dist directory to read: ``iter_<iteration>/model`` of a run's checkpoint
    directory when ``iteration`` is given, else what ``find_dist_checkpoint`` picks (newest)."""
    from kla_megatron.checkpoint.megatron_io import find_dist_checkpoint
    from kla_megatron.checkpoint import directory as ckpt

    if iteration is not None:
        chosen = Path(ckpt.step_dir(str(path), iteration))
        if not chosen.is_dir():
            have = [step for step, _ in ckpt.candidates(str(path))]
            raise FileNotFoundError(f"{path} has no checkpoint of iteration {iteration} "
                                    f"(iterations there: {sorted(have) if have else 'none'})")
        path = chosen
    model_dir = find_dist_checkpoint(path)
    iter_dir = model_dir.parent
    if (iter_dir / ckpt.MANIFEST).exists():  # the trainer's (or kla-convert's) published checkpoint
        problem = ckpt.check(str(iter_dir))
        if problem:
            raise ValueError(f"checkpoint {iter_dir} cannot be scored: {problem}")
    return model_dir


def iteration_of(model_dir: Path) -> Optional[int]:
    m = _ITER_RE.match(model_dir.parent.name)
    return int(m.group(1)) if m else None


def _hf_from_megatron_state(cfg, state):
    from kla_megatron.checkpoint import hf_io, names

    config = hf_io.make_config(names.hf_config_dict(cfg))
    return hf_io.hf_model(config, names.megatron_to_hf({k: v.float() for k, v in state.items()}, cfg.layer_pattern))


def trainer_model(model_dir: Path, model_config: Optional[str]):
    """The HF model holding a dist checkpoint's weights (any TP/PP it was saved at)."""
    from kla_megatron.checkpoint.megatron_io import (adapt_vocab, checkpoint_shapes, find_model_config,
                                                     load_megatron_state)
    from kla_megatron.models import load_model_config, read_stored_model_config

    if model_config:
        cfg = load_model_config(model_config)
    else:
        found = find_model_config(model_dir)
        if found is None:
            raise ValueError(f"no model_config.yaml next to {model_dir}: pass --model-config NAME_OR_YAML")
        cfg = read_stored_model_config(found)
    cfg = adapt_vocab(cfg, checkpoint_shapes(model_dir))
    return _hf_from_megatron_state(cfg, load_megatron_state(model_dir, cfg))


def reference_model(path: Path, norm_eps: float):
    from kla_megatron.checkpoint.reference import from_reference, read_reference_state

    cfg, state = from_reference(read_reference_state(path), norm_eps=norm_eps)
    return _hf_from_megatron_state(cfg, state)


def hf_dir_model(path: Path):
    from kla_megatron.checkpoint import hf_io

    config, state = hf_io.load_hf(path)
    return hf_io.hf_model(config, state)


def _has_hf_tokenizer(path: Path) -> bool:
    return (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists()


def hf_tokenizer(path: Path) -> Tokenizer:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)  # a standard class: no code runs
    if tok.eos_token_id is None:
        raise ValueError(f"the tokenizer in {path} has no EOS token (lm-eval's end-of-text token)")
    return Tokenizer(lambda text: tok.encode(text, add_special_tokens=False),
                     lambda ids: tok.decode(ids), int(tok.eos_token_id), len(tok),
                     str(path))


def training_tokenizer(path: str) -> Tokenizer:
    from kla_megatron.training.tokenizer import load_tokenizer

    tok = load_tokenizer(str(path))
    return Tokenizer(tok.tokenize, tok.detokenize, int(tok.eod), int(tok.vocab_size), str(path))


def run_config_tokenizer(config: str) -> str:
    """``data.tokenizer`` of a run config (read as written: its data files need not exist here)."""
    from kla_megatron.training.config import resolve_config_path
    from kla_megatron.yaml_io import parse_yaml

    path = resolve_config_path(config)
    raw = parse_yaml(path.read_text(), str(path)) or {}
    tokenizer = (raw.get("data") or {}).get("tokenizer") if isinstance(raw, dict) else None
    if not tokenizer:
        raise ValueError(f"run config {path} names no data.tokenizer: pass --tokenizer")
    return str(tokenizer)


def load(checkpoint, *, iteration: Optional[int] = None, tokenizer: Optional[str] = None,
         run_config: Optional[str] = None, model_config: Optional[str] = None, norm_eps: float = 1e-5) -> Loaded:
    """The model (fp32, CPU, eval mode) and tokenizer of any checkpoint kind."""
    path = Path(checkpoint)
    kind = source_kind(path)
    if iteration is not None and kind != "trainer":
        raise ValueError(f"--iteration applies to trainer checkpoint directories; {path} is a {kind} checkpoint")
    if tokenizer is None and run_config is not None:
        tokenizer = run_config_tokenizer(run_config)
    if tokenizer is None and not (kind == "hf" and _has_hf_tokenizer(path)):
        what = "has no tokenizer files" if kind == "hf" else "holds no tokenizer"
        raise ValueError(f"checkpoint {path} {what}: pass --tokenizer FILE or --config RUN_CONFIG (its data.tokenizer)")
    tok = training_tokenizer(tokenizer) if tokenizer is not None else hf_tokenizer(path)
    read, step = path, None
    if kind == "trainer":
        read = trainer_dir(path, iteration)
        step = iteration_of(read)
        model = trainer_model(read, model_config)
    elif kind == "hf":
        model = hf_dir_model(path)
    else:
        model = reference_model(path, norm_eps)
    vocab = model.config.vocab_size
    if tok.vocab_size > vocab:  # the trainer pads the model's vocabulary up, never down
        raise ValueError(f"tokenizer {tok.source} does not fit the model: {tok.vocab_size} ids, the model's "
                         f"vocabulary has {vocab}")
    return Loaded(model.eval(), tok, kind, read, step)
