"""Build or load a KLA model in one process (a CPU, or one GPU), outside the trainer.

megatron-core modules need a process group, model-parallel state and the CUDA RNG tracker
before they can be built; on a machine without CUDA they also need the CPU shim
(``kla_megatron/compat/cpu.py``). :func:`init_parallel` does that set-up once, and
:func:`build_model` / :func:`load_model` use it, so a script, a notebook, the converter and
the tests build models the same way::

    import kla_megatron
    model = kla_megatron.build_model("kla_125m", dtype=torch.bfloat16)      # random init
    model = kla_megatron.load_model("runs/my_run/checkpoints")              # newest iteration
    logits = model(input_ids, position_ids=None, attention_mask=None)       # [batch, seq, vocab]

Distributed training (TP/PP/CP/DP over several ranks) goes through ``kla-pretrain``; these
functions join an existing one-rank process group or create one.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist

from kla_megatron.models import (KLAModel, KLAModelConfig, KLARuntimeConfig, build_kla_model, load_model_config,
                                 read_stored_model_config)

DEFAULT_SEED = 1234


def _ensure_process_group() -> None:
    if dist.is_initialized():
        return
    from kla_megatron.parallel.local_ranks import free_port

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def init_parallel(tp: int = 1, pp: int = 1, *, cp: int = 1, vp: Optional[int] = None,
                  seed: int = DEFAULT_SEED) -> None:
    """(Re-)initialise megatron's model-parallel state (TP × CP × PP, the remaining ranks data-parallel)
    and seed the CPU and model-parallel CUDA RNGs. Creates a one-rank process group when there is
    none, and enables the CPU shim on a machine without CUDA."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kla_megatron.compat import enable_cpu_megatron

    _ensure_process_group()
    enable_cpu_megatron()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             context_parallel_size=cp, virtual_pipeline_model_parallel_size=vp)
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def _device(device) -> torch.device:
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for, but this machine has no CUDA GPU")
    if device.type == "cpu" and torch.cuda.is_available():
        # megatron-core's CUDA paths stay active on a GPU machine; the HF model (kla_megatron/hf) runs on its CPU
        raise ValueError("device='cpu' on a machine with a GPU: use the GPU, or export the checkpoint with "
                         "`kla-convert megatron-to-hf` and run the Hugging Face model on the CPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device}: only 'cpu' and 'cuda' are supported")
    return device


def resolve_config(config: Union[str, Path, KLAModelConfig], overrides: Optional[dict] = None) -> KLAModelConfig:
    """The model config a name, path or config object stands for, with ``overrides`` (model config
    keys as the YAML files write them: ``num_layers=2``, ``kla_heads=4``) applied."""
    cfg = config if isinstance(config, KLAModelConfig) else load_model_config(config)
    if not overrides:
        return cfg
    return KLAModelConfig.from_dict({**cfg.to_flat(), **overrides}, "model config overrides")


def resolve_runtime(runtime: Optional[KLARuntimeConfig]) -> KLARuntimeConfig:
    """``runtime`` (default ``KLARuntimeConfig()``); without CUDA a Triton scan backend becomes
    ``auto`` (the Triton kernels need a GPU; ``auto`` picks the fastest exact CPU scan)."""
    runtime = runtime or KLARuntimeConfig()
    if not torch.cuda.is_available() and runtime.scan_backend == "triton":
        runtime = dataclasses.replace(runtime, scan_backend="auto")
    return runtime


def build_model(config: Union[str, Path, KLAModelConfig], *, device=None, dtype: torch.dtype = torch.float32,
                seed: int = DEFAULT_SEED, runtime: Optional[KLARuntimeConfig] = None, **overrides) -> KLAModel:
    """A randomly initialised KLA (or hybrid) model on one process.

    ``config``: a :class:`KLAModelConfig`, a model name from ``configs/models/`` (``"kla_125m"``)
    or a YAML path; ``overrides`` replace config keys (``num_layers=2``); ``runtime`` chooses the
    scan kernels and recompute (``KLARuntimeConfig``). ``device`` defaults to
    the GPU when there is one. The model is in training mode, like a freshly built torch module."""
    cfg = resolve_config(config, overrides)
    device = _device(device)
    init_parallel(seed=seed)
    tc = cfg.to_transformer_config(params_dtype=dtype, use_cpu_initialization=device.type == "cpu")
    return build_kla_model(cfg, tc, runtime=resolve_runtime(runtime)).to(device)


def _checkpoint_dir(checkpoint, iteration: Optional[int]) -> Path:
    from kla_megatron.checkpoint.megatron_io import find_dist_checkpoint
    from kla_megatron.checkpoint import directory as ckpt

    if iteration is None:
        return find_dist_checkpoint(checkpoint)
    path = Path(ckpt.step_dir(str(checkpoint), iteration))
    if not path.is_dir():
        found = [step for step, _ in ckpt.complete_checkpoints(str(checkpoint), warn=False)]
        raise FileNotFoundError(f"no checkpoint of iteration {iteration} under {checkpoint}; complete ones: {found}")
    problem = ckpt.incomplete_reason(str(path))
    if problem:
        raise ValueError(f"checkpoint {path} cannot be loaded: {problem}")
    return find_dist_checkpoint(path)


def load_model(checkpoint: Union[str, Path], *, iteration: Optional[int] = None, device=None,
               dtype: torch.dtype = torch.float32) -> KLAModel:
    """A model with the weights of a megatron checkpoint: a trainer's checkpoint directory (its
    newest complete iteration, or ``iteration``), one ``iter_N`` directory, or a directory written
    by ``kla-convert``. The architecture comes from the ``model_config.yaml`` the trainer and the
    converter store next to the weights; any TP/PP layout loads. Returned in eval mode."""
    from kla_megatron.checkpoint.megatron_io import (adapt_vocab, checkpoint_shapes, find_model_config,
                                                     load_into)

    ckpt_dir = _checkpoint_dir(checkpoint, iteration)
    config_file = find_model_config(ckpt_dir)
    if config_file is None:
        raise FileNotFoundError(f"no model_config.yaml next to the checkpoint {ckpt_dir} (or in its parents)")
    cfg = adapt_vocab(read_stored_model_config(config_file), checkpoint_shapes(ckpt_dir))
    model = build_model(cfg, device=device, dtype=dtype)
    load_into(model, ckpt_dir)
    return model.eval()
