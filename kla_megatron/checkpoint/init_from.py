"""``checkpoint.init_from``: start a training run from converted or imported weights.

Sources (what ``source_kind`` recognises):

- ``hf``: a Hugging Face directory written by ``kla-convert megatron-to-hf`` / ``reference-to-hf``
  (``config.json`` + ``model*.safetensors``; a ``model*.safetensors`` path means its directory);
- ``megatron``: a megatron dist checkpoint — a run's checkpoint root (its latest complete
  ``iter_*``), an ``iter_*`` directory or its ``model/`` directory, written by the trainer at any
  TP/PP/DP (its optimizer state is ignored) or by ``kla-convert``;
- ``reference``: the paper's reference weights (``.pt``/``.pth``/``.safetensors``/``.npz``, as
  ``kla-convert reference-to-*`` reads them; ``norm_eps`` comes from the run's model config).

Only the model weights are loaded, into this rank's part of the model at the run's layout; the
optimizer (its fp32 main weights are refreshed from the loaded weights), the step counter, the
data position and the LR schedule start fresh. A run that finds its own checkpoint in
``checkpoint.dir`` resumes from it instead (so a requeued job does not start over).

The source's architecture must be the run's model (every ``KLAModelConfig`` architecture field
but ``max_seq_len``); the vocabulary may be smaller than the run's padded one
(``KLAModelConfig.padded_vocab_size``) if it covers the model config's ``vocab_size``: the extra rows keep their
initialisation. Every problem is a one-line ValueError naming the file and the mismatch.

HF sources are read lazily (safetensors slices): each rank reads only its own shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

REFERENCE_SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def source_kind(path) -> Tuple[str, Path]:
    """('hf' | 'megatron' | 'reference', the path to read) for an init_from source."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"checkpoint.init_from: {p} does not exist (expected a Hugging Face export directory, a "
                         f"megatron checkpoint directory or reference weights {'/'.join(REFERENCE_SUFFIXES)})")
    if p.is_dir():
        return ("hf", p) if (p / "config.json").exists() else ("megatron", p)
    if p.name.startswith("model") and p.suffix == ".safetensors" and (p.parent / "config.json").exists():
        return "hf", p.parent
    if p.suffix in REFERENCE_SUFFIXES:
        return "reference", p
    raise ValueError(f"checkpoint.init_from: {p} is a file but not reference weights "
                     f"({'/'.join(REFERENCE_SUFFIXES)}), and not inside a Hugging Face export directory")


def architecture_diff(source, target) -> str:
    """'' if the two KLAModelConfigs describe the same architecture (up to vocab_size and
    max_seq_len), else 'field <source value> (run: <target value>)' for each difference."""
    from .names import architecture_fields

    a, b = architecture_fields(source), architecture_fields(target)
    return ", ".join(f"{n} {a[n]!r} (run: {b[n]!r})" for n in a if n not in ("vocab_size", "max_seq_len") and a[n] != b[n])


# ---------------------------------------------------------------- tensor sources (TP = PP = 1 names)


class _DictSource:
    """A full TP = PP = 1 megatron state dict in memory (reference weights)."""

    def __init__(self, state: Dict[str, torch.Tensor], what: str):
        self.state, self.what = state, what

    def shape(self, key: str) -> Optional[tuple]:
        t = self.state.get(key)
        return None if t is None else tuple(t.shape)

    def get(self, key: str, index: tuple) -> torch.Tensor:
        return self.state[key][index]

    def close(self):
        pass


class _HFSource:
    """An HF directory read lazily: each requested slice is read from its safetensors shard."""

    def __init__(self, hf_dir: Path, pattern: str):
        from safetensors import safe_open

        from . import hf_io
        from .names import check_state_dict, hf_name

        self.pattern, self._hf_name, self.what = pattern, hf_name, str(hf_dir)
        index = hf_dir / hf_io.INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = [hf_io.SINGLE_FILE]
        self.handles, self.file_of, shapes = {}, {}, {}
        for name in files:
            path = hf_dir / name
            if not path.exists():
                raise ValueError(f"{path} does not exist" + (f" (listed in {index})" if index.exists() else ""))
            try:
                handle = safe_open(str(path), framework="pt")
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
                    self.file_of[key] = name
            except Exception as exc:
                raise ValueError(f"corrupt or truncated safetensors file {path}: {exc}") from None
            self.handles[name] = handle
        self.shapes = shapes
        config = hf_io.read_config(hf_dir)
        self.config = config
        check_state_dict({k: torch.empty(s, device="meta") for k, s in shapes.items()},
                         hf_io.expected_tensors(config), f"HF checkpoint {hf_dir}")

    def _name(self, key: str) -> str:
        return self._hf_name(key, self.pattern)

    def shape(self, key: str) -> Optional[tuple]:
        try:
            return self.shapes.get(self._name(key))
        except KeyError:
            return None

    def get(self, key: str, index: tuple) -> torch.Tensor:
        name = self._name(key)
        handle = self.handles[self.file_of[name]]
        if not index:  # a 0-dim tensor
            return handle.get_tensor(name)
        return handle.get_slice(name)[index]

    def close(self):
        self.handles.clear()


# ---------------------------------------------------------------- filling this rank's shards


def _local_index(global_slice, offset: int = 0, dim: int = 0):
    index = list(global_slice)
    if offset:
        s = index[dim]
        index[dim] = slice(s.start + offset, s.stop + offset)
    return index


@torch.no_grad()
def _copy(target: torch.Tensor, source, key: str, index: list, vocab_rows: Optional[int]) -> None:
    """Copy source[key][index] into target (this rank's shard); for the vocabulary tensors only
    the rows the source has (``vocab_rows``) are copied."""
    if vocab_rows is not None and index:
        rows = index[0]
        stop = min(rows.stop, vocab_rows)
        if stop <= rows.start:
            return
        index = [slice(rows.start, stop), *index[1:]]
        target = target[: stop - rows.start]
    value = source.get(key, tuple(index))
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{source.what}: {key}: read {tuple(value.shape)} for a shard of {tuple(target.shape)}")
    target.copy_(value)


def fill_from_full(chunks, source, raw_vocab: int) -> None:
    """Copy this rank's shard of every model tensor from ``source`` (global TP = PP = 1 names),
    for each model chunk (any TP/PP/VP layout): the shards are those of the chunks' sharded state
    dicts, so this follows exactly what dist checkpointing would load."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    problems = []

    def stored_shape(key, expected):
        shape = source.shape(key)
        if shape is None:
            problems.append(f"{key} is not in the source")
            return None, False
        if key in _VOCAB_KEYS and len(shape) == len(expected) and shape[1:] == tuple(expected[1:]) \
                and raw_vocab <= shape[0] <= expected[0]:
            return shape, True
        if shape != tuple(expected):
            problems.append(f"{key}: source {shape} != model {tuple(expected)}")
            return None, False
        return shape, False

    jobs = []
    for chunk in chunks:
        for item in nested_values(chunk.sharded_state_dict()):
            if isinstance(item, ShardedTensorFactory):
                parts = [p for p in nested_values(item.build()) if isinstance(p, ShardedTensor)]
                full = source.shape(item.key)
                if full is None:
                    problems.append(f"{item.key} is not in the source")
                    continue
                sizes, dim = {}, None
                for p in parts:
                    sizes.setdefault(p.key, p.global_shape)
                    diff = [d for d, (a, b) in enumerate(zip(p.global_shape, full)) if a != b]
                    if len(diff) > 1 or len(p.global_shape) != len(full):
                        problems.append(f"{item.key}: source {full} does not split into {p.key} {p.global_shape}")
                        break
                    dim = diff[0] if diff else (dim or 0)
                else:
                    starts, at = {}, 0
                    for k, shape in sizes.items():
                        starts[k], at = at, at + shape[dim]
                    if at != full[dim]:
                        problems.append(f"{item.key}: source {full} != parts {list(sizes.values())}")
                        continue
                    for p in parts:
                        jobs.append((p.data, item.key, _local_index(p.global_slice(), starts[p.key], dim), None))
            elif isinstance(item, ShardedTensor):
                if item.flattened_range is not None:  # pragma: no cover (model weights are never flattened)
                    raise ValueError(f"{item.key}: flattened model shards are not supported")
                if item.prepend_axis_num:  # pragma: no cover (our layers use no stacked axes)
                    raise ValueError(f"{item.key}: sharded tensors with prepended axes are not supported")
                shape, partial = stored_shape(item.key, item.global_shape)
                if shape is not None:
                    jobs.append((item.data, item.key, list(item.global_slice()), shape[0] if partial else None))
            # anything else (ShardedObject extra states) stays as built
    if problems:
        raise ValueError(f"{source.what} does not match the run's model: " + "; ".join(problems[:6])
                         + (f" ... ({len(problems)} problems)" if len(problems) > 6 else ""))
    for target, key, index, vocab_rows in jobs:
        _copy(target, source, key, index, vocab_rows)


# ---------------------------------------------------------------- the trainer's entry point


def load_weights(src, chunks, model_cfg, raw_vocab: int) -> str:
    """Load ``src``'s model weights into this rank's ``chunks`` (the run's layout); returns a
    description of what was loaded. Every rank must call it (megatron sources load collectively)."""
    from kla_megatron.models import read_stored_model_config

    kind, path = source_kind(src)
    if kind == "megatron":
        from .megatron_io import find_dist_checkpoint, find_model_config, load_into

        try:
            ckpt_dir = find_dist_checkpoint(path)
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
        found = find_model_config(ckpt_dir)
        if found is not None:
            diff = architecture_diff(read_stored_model_config(found), model_cfg)
            if diff:
                raise ValueError(f"{found}: the checkpoint's architecture is not the run's model: {diff}")
        load_into(list(chunks), ckpt_dir)
        return f"megatron checkpoint {ckpt_dir}"
    if kind == "hf":
        from .names import model_config_from_hf

        source = _HFSource(path, model_cfg.layer_pattern)
        diff = architecture_diff(model_config_from_hf(source.config), model_cfg)
        if diff:
            raise ValueError(f"{path / 'config.json'}: the checkpoint's architecture is not the run's model: {diff}")
        what = f"Hugging Face checkpoint {path}"
    else:
        from .reference import from_reference, read_reference_state

        try:
            raw = read_reference_state(path)
        except Exception as exc:  # not a tensor file, a pickle that is not plain tensors, ...
            raise ValueError(f"cannot read {path} as reference weights: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}") from None
        try:
            cfg, state = from_reference(raw, norm_eps=model_cfg.norm_eps)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        except (KeyError, IndexError, RuntimeError, AttributeError) as exc:
            raise ValueError(f"{path} is not a reference KLA SequenceModel state dict: {exc!r}") from None
        diff = architecture_diff(cfg, model_cfg)
        if diff:
            raise ValueError(f"{path}: the reference model's architecture is not the run's model: {diff}")
        source = _DictSource(state, str(path))
        what = f"reference weights {path}"
    try:
        fill_from_full(chunks, source, raw_vocab)
    finally:
        source.close()
    return what


def init_from_weights(trainer) -> Optional[str]:
    """The trainer's hook, called once after ``resume()``: when ``checkpoint.init_from`` is set
    and the run did not resume from its own checkpoint, load the source's model weights and
    refresh the optimizer's main weights from them. Errors: ValueError 'checkpoint.init_from: ...'."""
    run = trainer.run
    src = run.checkpoint.init_from
    if not src:
        return None
    if trainer.history.resumed_from is not None:
        trainer.log(f"checkpoint.init_from {src} not used: the run resumed from {trainer.history.resumed_from}")
        return None
    if run.engine != "megatron":
        raise ValueError(f"checkpoint.init_from needs engine 'megatron' (this run uses '{run.engine}')")
    raw_vocab = run.model.vocab_size
    try:
        what = load_weights(src, trainer.engine.raw_chunks, trainer.model_cfg, raw_vocab)
    except ValueError as exc:
        message = str(exc)
        raise ValueError(message if message.startswith("checkpoint.init_from") else
                         f"checkpoint.init_from: {message}") from None
    trainer.engine.optimizer.reload_model_params()
    trainer.log(f"initialized the model from {what} (weights only: fresh optimizer, step 0)")
    return what
