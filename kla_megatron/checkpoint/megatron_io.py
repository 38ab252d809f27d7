"""Megatron dist (torch_dist) checkpoints: find, read at TP = PP = 1, write at any TP/PP.

Reading builds the model at TP = PP = 1 and asks dist checkpointing for its sharded state
dict: megatron merges whatever TP/PP/DP/CP shards the checkpoint was saved with (our sharded
state dicts use global layer numbers and a TP-independent split of the fused in_proj).
Writing a chosen layout spawns TP·PP gloo ranks that build their part of the model, load it
from a TP = PP = 1 checkpoint and save it again.

Directory written (what the trainer's checkpoint discovery expects)::

    <out>/iter_0000000/model/      torch_dist files (model weights only, no optimizer)
    <out>/iter_0000000/manifest.json
    <out>/model_config.yaml        the KLAModelConfig (also read back by kla-convert)
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist

from kla_megatron.models import MODEL_CONFIG_FILE, KLAModelConfig, save_model_config

from . import ranks
from .names import check_state_dict, shape_mismatch

_MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")


def find_dist_checkpoint(path) -> Path:
    """The torch_dist directory inside ``path``: itself, ``<path>/model``, or the latest
    complete ``iter_*/model`` of a run's checkpoint root."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"megatron checkpoint {path} does not exist")
    for candidate in (path, path / "model"):
        if (candidate / "metadata.json").exists():
            return candidate
    from kla_megatron.checkpoint import directory as ckpt

    latest = ckpt.latest(str(path))
    if latest is not None and (Path(latest) / "model" / "metadata.json").exists():
        return Path(latest) / "model"
    raise FileNotFoundError(
        f"{path} is not a megatron dist checkpoint: no metadata.json in it or in model/, and no complete "
        "iter_*/ checkpoint under it (a checkpoint without manifest.json is incomplete)"
    )


def find_model_config(ckpt_dir: Path) -> Optional[Path]:
    """``model_config.yaml`` next to the checkpoint (the dist dir, its iter dir, or the run root)."""
    for parent in (ckpt_dir, *list(ckpt_dir.parents)[:3]):
        if (parent / MODEL_CONFIG_FILE).exists():
            return parent / MODEL_CONFIG_FILE
    return None


def checkpoint_shapes(ckpt_dir) -> Dict[str, tuple]:
    """Global shape of every tensor stored in a torch_dist checkpoint (from its metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(str(ckpt_dir)).read_metadata()
    except Exception as exc:
        raise ValueError(f"cannot read the dist checkpoint metadata in {ckpt_dir}: {exc}") from exc
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if hasattr(v, "size")}


def adapt_vocab(cfg: KLAModelConfig, shapes: Dict[str, tuple]) -> KLAModelConfig:
    """The trainer pads the vocabulary (``KLAModelConfig.padded_vocab_size``): take the checkpoint's padded size."""
    stored = shapes.get("embedding.word_embeddings.weight")
    if stored and cfg.is_padding_of(stored[0]):
        return dataclasses.replace(cfg, vocab_size=stored[0])
    return cfg


def build_model(cfg: KLAModelConfig, tp: int = 1, pp: int = 1, dtype=torch.float32):
    """This rank's part of the model (parallel state set up for ``tp`` × ``pp``)."""
    from megatron.core import parallel_state

    from kla_megatron.api import init_parallel, resolve_runtime
    from kla_megatron.models import build_kla_model

    init_parallel(tp, pp)
    tc = cfg.to_transformer_config(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, params_dtype=dtype)
    return build_kla_model(cfg, tc, pre_process=parallel_state.is_pipeline_first_stage(),
                           post_process=parallel_state.is_pipeline_last_stage(), runtime=resolve_runtime(None))


def _short(keys, n: int = 8) -> str:
    keys = sorted(keys)
    return str(keys[:n])[:-1] + (f", ... ({len(keys)} in all)]" if len(keys) > n else "]")


def check_model_shapes(models, ckpt_dir) -> None:
    """ValueError (one line) when the checkpoint's model tensors and the model's sharded tensors
    disagree: tensors the model needs that are not stored, stored model tensors the model lacks,
    or different global shapes. Everything else stored (optimizer state, ...) is ignored."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    stored = {k: v for k, v in checkpoint_shapes(ckpt_dir).items() if k.startswith(_MODEL_PREFIXES)}
    wanted = {}
    for model in models:
        sharded = model.sharded_state_dict()
        apply_factories(sharded)
        for item in nested_values(sharded):
            if isinstance(item, ShardedTensor):
                wanted[item.key] = tuple(item.global_shape)
            elif isinstance(item, ShardedTensorFactory):  # pragma: no cover (applied above)
                raise TypeError(item.key)
    if dist.is_initialized() and dist.get_world_size() > 1:  # pipeline stages hold different layers
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, wanted)
        for other in every:
            wanted.update(other)
    missing, unknown, differ = shape_mismatch(stored, wanted)
    shapes = [f"{k}: stored {have} != model {want}" for k, have, want in differ]
    problems = []
    if missing:
        problems.append(f"tensors the model needs are not stored: {_short(missing)}")
    if unknown:
        problems.append(f"stored tensors the model does not have: {_short(unknown)}")
    if shapes:
        problems.append("different shapes: " + "; ".join(shapes[:6]) + (" ..." if len(shapes) > 6 else ""))
    if problems:
        raise ValueError(f"megatron checkpoint {ckpt_dir} does not match the model config: " + "; ".join(problems))


def load_into(model, ckpt_dir) -> None:
    """Load ``model``'s tensors (one chunk, or a list of virtual-pipeline chunks) from a dist
    checkpoint, model weights only. The checkpoint may be the trainer's (it also holds the
    optimizer state and ``common``; both are ignored) or one written by kla-convert. Model
    tensors the checkpoint lacks, stored model tensors this architecture lacks and mis-shaped
    tensors are one-line ValueErrors."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    check_model_shapes(models, ckpt_dir)
    keys = ["model"] if len(models) == 1 else [f"model{i}" for i in range(len(models))]
    request = {key: m.sharded_state_dict() for key, m in zip(keys, models)}
    try:
        # Checkpoint entries nobody asks for (optimizer state) are "missing" in megatron's terms:
        # RETURN_UNEXPECTED ignores them; requested tensors that are not stored come back as unexpected.
        state, _, unexpected = dist_checkpointing.load(request, str(ckpt_dir),
                                                       strict=StrictHandling.RETURN_UNEXPECTED)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load the model weights of the megatron checkpoint {ckpt_dir}: "
                         f"{type(exc).__name__}: {first[:500]}") from exc
    if unexpected:
        raise ValueError(f"megatron checkpoint {ckpt_dir} does not match the model config: tensors the model needs "
                         f"are not stored: {_short(unexpected)}")
    for key, m in zip(keys, models):
        m.load_state_dict(state[key], strict=True)


def _load_full(ckpt_dir: str, cfg: KLAModelConfig, dtype):
    model = build_model(cfg, 1, 1, dtype)
    load_into(model, ckpt_dir)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}


def load_megatron_state(ckpt_dir, cfg: KLAModelConfig, dtype=torch.float32) -> Dict[str, torch.Tensor]:
    """Full (TP = PP = 1) state dict of a dist checkpoint saved at any layout."""
    return ranks.run(_load_full, 1, (str(ckpt_dir), cfg, dtype))


def _save_full(state, cfg: KLAModelConfig, out_model_dir: str, dtype):
    from megatron.core import dist_checkpointing

    model = build_model(cfg, 1, 1, dtype)
    expected = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    check_state_dict(state, expected, "megatron model")
    model.load_state_dict(state, strict=False)  # only _extra_state entries are absent (checked above)
    os.makedirs(out_model_dir, exist_ok=True)
    dist_checkpointing.save({"model": model.sharded_state_dict(), "common": {"step": 0, "consumed_samples": 0}},
                            out_model_dir)


def _reshard(src_dir: str, cfg: KLAModelConfig, out_model_dir: str, tp: int, pp: int, dtype):
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    model = build_model(cfg, tp, pp, dtype)
    load_into(model, src_dir)
    if dist.get_rank() == 0:
        os.makedirs(out_model_dir, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save({"model": model.sharded_state_dict(), "common": {"step": 0, "consumed_samples": 0}},
                            out_model_dir)
    dist.barrier()


def _publish(out_root: Path, tmp_model_dir: Path, cfg: KLAModelConfig, tp: int, pp: int) -> Path:
    """Move a written model dir into ``<out>/iter_0000000/`` with a manifest (atomic rename)."""
    from kla_megatron.checkpoint import directory as ckpt

    out_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(ckpt.step_dir(str(out_root), 0) + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    shutil.move(str(tmp_model_dir), str(tmp / "model"))
    ckpt.commit(str(out_root), 0, {"layout": {"tp": tp, "pp": pp}, "converted_by": "kla-convert"}, keep_last=0)
    save_model_config(cfg, out_root)
    return Path(ckpt.step_dir(str(out_root), 0))


def save_megatron(state: Dict[str, torch.Tensor], cfg: KLAModelConfig, out_root, tp: int = 1, pp: int = 1,
                  dtype=torch.float32) -> Path:
    """Write a TP = PP = 1 state dict as a dist checkpoint laid out for ``tp`` × ``pp``."""
    out_root = Path(out_root)
    with tempfile.TemporaryDirectory(dir=out_root.parent if out_root.parent.exists() else None) as tmp:
        full = Path(tmp) / "tp1"
        ranks.run(_save_full, 1, (state, cfg, str(full), dtype))
        if (tp, pp) == (1, 1):
            return _publish(out_root, full, cfg, tp, pp)
        target = Path(tmp) / "target"
        ranks.run(_reshard, tp * pp, (str(full), cfg, str(target), tp, pp, dtype))
        return _publish(out_root, target, cfg, tp, pp)


def reshard(src, cfg: KLAModelConfig, out_root, tp: int, pp: int, dtype=torch.float32) -> Path:
    """Offline resharding: load ``src`` (any layout) at ``tp`` × ``pp`` and save it there."""
    src_dir = find_dist_checkpoint(src)
    out_root = Path(out_root)
    with tempfile.TemporaryDirectory(dir=out_root.parent if out_root.parent.exists() else None) as tmp:
        target = Path(tmp) / "target"
        ranks.run(_reshard, tp * pp, (str(src_dir), cfg, str(target), tp, pp, dtype))
        return _publish(out_root, target, cfg, tp, pp)
