"""Typed run configuration: YAML files in ``configs/`` plus ``--set a.b=value`` overrides.

A run config holds the model's architecture (``model:`` a name in ``configs/models/``, a YAML
path, or the model's keys inline; ``--set model.d_state=8`` changes one key) as a
``KLAModelConfig``, and describes everything else about the job: parallel layout, batch sizes, optimisation, data, checkpoints, logging and
the engine. Each section is a kw_only dataclass whose ``__post_init__`` checks only that
section; :meth:`RunConfig.validate_world` checks what needs the world size (the layout).
How the model runs (scan backend, recompute) is :meth:`RunConfig.runtime`; the trainer builds
``run.model.with_padded_vocab(parallel.tensor)`` with it, and nothing rewrites ``run.model``.

Errors (all ``ValueError``, documented here because users and tests match on them):

- ``unknown key 'train.lrr' in <source> (did you mean 'train.lr'?)``
- ``<key>: expected <type>, got <value>`` for values of the wrong type
- ``bad --set override '<text>': expected KEY=VALUE``
- ``parallel layout: world size W is not divisible by tensor*pipeline*context = N`` and
  ``parallel layout: <...> must be >= 1``
- ``parallel layout: train.seq_length S is not divisible by 2*context = N`` (context parallelism)
- ``batch sizes: global_batch_size G is not divisible by micro_batch_size M * data-parallel size D``
- ``data: path '<prefix>' has no <prefix>.bin/.idx (build it with data_tools ...)``
- ``train.<field> must be one of [...], got '<value>'`` for enumerations
- ``engine 'deepspeed' does not support <feature>`` for impossible engine combinations
- ``checkpoint.init_from: <path> does not exist (...)``; the trainer adds one-line
  ``checkpoint.init_from: <file>: ...`` errors for a source that does not fit the run's model
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kla_megatron.configs import RUN_CONFIG_DIR as CONFIG_DIR
from kla_megatron.layers.runtime import KLARuntimeConfig
from kla_megatron.models.config import KLAModelConfig, load_model_config, model_config_path, read_model_yaml
from kla_megatron.yaml_io import parse_yaml


def _one_of(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name} must be one of {list(allowed)}, got {value!r}")


def _positive(section: str, **values) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{section}.{name} must be >= 1, got {value}")


@dataclass(kw_only=True)
class ParallelConfig:
    """Model-parallel layout; data parallelism takes the remaining ranks."""

    tensor: int = 1
    """Tensor-parallel size (TP)."""
    pipeline: int = 1
    """Pipeline-parallel size (PP)."""
    virtual_pipeline: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); None = plain 1F1B."""
    context: int = 1
    """Context-parallel size (CP)."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tensor > 1)."""
    data: int | None = None
    """Expected data-parallel size; None = derive from the world size. Set it to catch launch mistakes."""

    def __post_init__(self):
        try:
            _positive("parallel", tensor=self.tensor, pipeline=self.pipeline, context=self.context,
                      virtual_pipeline=self.virtual_pipeline, data=self.data)
        except ValueError as exc:
            raise ValueError(f"parallel layout: {exc}") from None
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("parallel layout: sequence_parallel needs parallel.tensor > 1")
        if self.virtual_pipeline is not None and self.pipeline == 1:
            raise ValueError("parallel layout: virtual_pipeline needs parallel.pipeline > 1")

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline * self.context


@dataclass(kw_only=True)
class TrainConfig:
    """Batch sizes, optimisation, schedule, precision and fault policy."""

    steps: int = 100
    """Optimizer steps to train (the schedule's total length)."""
    micro_batch_size: int = 1
    """Sequences per forward pass per data-parallel rank."""
    global_batch_size: int = 8
    """Sequences per optimizer step over all ranks (micro-batches are accumulated)."""
    seq_length: int = 512
    """Tokens per training sequence."""
    seed: int = 1234
    lr: float = 3e-4
    min_lr: float = 3e-5
    lr_schedule: str = "cosine"
    """'cosine', 'wsd' (warmup-stable-decay), 'linear' or 'constant'."""
    warmup_steps: int = 0
    decay_steps: int | None = None
    """WSD: length of the final decay phase (default 20% of steps)."""
    wsd_decay_style: str = "linear"
    """WSD decay shape: 'linear', 'cosine' or '1-sqrt'."""
    decay_fraction: float | None = None
    """WSD: the final decay phase as a fraction of train.steps (e.g. 0.4: constant, then decay over
    the last 40 %); an alternative to decay_steps, which it excludes."""
    embedding_lr: float | None = None
    """Peak learning rate of the input embedding, on the same schedule as lr; None = train.lr."""
    ssm_group_extra: list = field(default_factory=list)
    """Parameters (by the last part of their name, e.g. 'lambda_skip') that join the KLA SSM group
    (A_log, delta_raw, p): the model's ssm_lr_mult times the learning rate and no weight decay."""
    decay_conv: bool = True
    """Weight decay on the KLA causal-conv kernels; false decays only 2-D hidden and head weights."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 disables."""
    precision: str = "bf16"
    """'bf16' (bf16 compute, fp32 master weights; the scan runs in fp32) or 'fp32'."""
    recompute: str = "none"
    """Activation recomputation: 'none'; 'selective' (the KLA scans and core attention are recomputed
    in backward); 'full' (whole layers are recomputed)."""
    deterministic: bool = False
    """Deterministic algorithms (bitwise reproducible on CPU); slower."""
    nan_policy: str = "skip"
    """Non-finite loss or grad norm: 'skip' the step or 'abort' (last good checkpoint stays intact)."""
    max_skipped_steps: int = 10
    """With nan_policy 'skip': abort after this many consecutive skipped steps."""
    exit_at_step: int | None = None
    """Stop (after a checkpoint) once this step is done, e.g. to fit a job's time limit; the
    schedule still spans train.steps and a later run resumes from there."""
    eval_interval: int = 0
    """Validation every N steps (0 = never)."""
    eval_iters: int = 4
    """Global batches per validation."""
    kla_backend: str = "auto"
    """KLA scan backend ('auto': Triton on CUDA, the fastest exact torch scan otherwise); the
    runtime's scan_backend (RunConfig.runtime)."""

    def __post_init__(self):
        _positive("train", steps=self.steps, micro_batch_size=self.micro_batch_size,
                  global_batch_size=self.global_batch_size, seq_length=self.seq_length,
                  eval_iters=self.eval_iters, max_skipped_steps=self.max_skipped_steps)
        _one_of("train", "lr_schedule", self.lr_schedule, ("cosine", "wsd", "linear", "constant"))
        _one_of("train", "wsd_decay_style", self.wsd_decay_style, ("linear", "cosine", "1-sqrt"))
        _one_of("train", "precision", self.precision, ("bf16", "fp32"))
        _one_of("train", "recompute", self.recompute, ("none", "selective", "full"))
        _one_of("train", "nan_policy", self.nan_policy, ("skip", "abort"))
        _one_of("train", "kla_backend", self.kla_backend, ("auto", "torch", "triton", "naive"))
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"batch sizes: global_batch_size {self.global_batch_size} is not divisible by "
                             f"micro_batch_size {self.micro_batch_size}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(f"train.warmup_steps must be in [0, train.steps={self.steps}], got {self.warmup_steps}")
        if self.decay_steps is not None and not 0 <= self.decay_steps <= self.steps - self.warmup_steps:
            raise ValueError(f"train.decay_steps must be in [0, steps - warmup_steps = "
                             f"{self.steps - self.warmup_steps}], got {self.decay_steps}")
        if self.decay_fraction is not None:
            if not 0 < self.decay_fraction <= 1:
                raise ValueError(f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
            if self.decay_steps is not None:
                raise ValueError("train.decay_fraction and train.decay_steps both set the WSD decay length; set one")
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise ValueError(f"train.embedding_lr must be > 0 (or null for train.lr), got {self.embedding_lr}")
        if not all(isinstance(n, str) and n and "." not in n for n in self.ssm_group_extra):
            raise ValueError("train.ssm_group_extra must be a list of parameter names without dots, e.g. "
                             f"[lambda_skip], got {self.ssm_group_extra!r}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"train.lr must be > 0 and 0 <= train.min_lr <= train.lr, got lr={self.lr} "
                             f"min_lr={self.min_lr}")
        if self.exit_at_step is not None and not 1 <= self.exit_at_step <= self.steps:
            raise ValueError(f"train.exit_at_step must be in [1, train.steps={self.steps}], got {self.exit_at_step}")
        if self.eval_interval < 0:
            raise ValueError(f"train.eval_interval must be >= 0, got {self.eval_interval}")


@dataclass(kw_only=True)
class DataConfig:
    """Where training sequences come from."""

    kind: str = "mock"
    """'mock' (megatron MockGPTDataset, no files) or 'indexed' (megatron .bin/.idx corpora)."""
    blend: list = field(default_factory=list)
    """Indexed corpora: a list of path prefixes, or of [weight, prefix] pairs for a weighted blend.
    Relative prefixes are resolved against the run config's directory's parent (the repo root)."""
    split: str = "98,1,1"
    """Train/valid/test split of every corpus, in parts."""
    tokenizer: str | None = None
    """The corpus's tokenizer: a sentencepiece .model, a tokenizer.json (or its folder) or a tiktoken rank file
    (kla_megatron/tokenizers; its vocab size must fit the model's); None for mock data."""
    packed_documents: bool = True
    """Pass document boundaries inside a packed sequence to the model as packed-sequence boundaries
    (KLA resets its state per document)."""
    cache_dir: str | None = None
    """Where megatron caches sample indices (default: next to the first corpus)."""

    def __post_init__(self):
        _one_of("data", "kind", self.kind, ("mock", "indexed"))
        if self.kind == "indexed" and not self.blend:
            raise ValueError("data: kind 'indexed' needs data.blend (a list of corpus path prefixes)")
        if self.kind == "indexed" and not self.tokenizer:
            raise ValueError("data: kind 'indexed' needs data.tokenizer (the tokenizer the corpus was "
                             "tokenized with: its EOD id separates documents)")
        parts = self.split.split(",")
        if len(parts) != 3 or not all(p.strip().replace(".", "", 1).isdigit() for p in parts):
            raise ValueError(f"data.split must be three comma-separated numbers like '98,1,1', got {self.split!r}")

    def weights_and_prefixes(self) -> tuple[list[float] | None, list[str]]:
        if all(isinstance(b, str) for b in self.blend):
            return None, list(self.blend)
        try:
            return [float(w) for w, _ in self.blend], [str(p) for _, p in self.blend]
        except (TypeError, ValueError):
            raise ValueError(f"data.blend must be a list of prefixes or of [weight, prefix] pairs, "
                             f"got {self.blend!r}") from None

    def check_paths(self) -> None:
        for prefix in self.weights_and_prefixes()[1]:
            if not (os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx")):
                raise ValueError(f"data: path '{prefix}' has no {prefix}.bin/.idx (build it with data_tools, e.g. "
                                 f"`python -m data_tools.prepare_sample --out DIR`)")
        if self.tokenizer is not None and not os.path.exists(self.tokenizer):
            raise ValueError(f"data: tokenizer '{self.tokenizer}' does not exist")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Distributed checkpoints: save cadence, retention and resume."""

    dir: str | None = None
    """Checkpoint root; None disables saving and resuming."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end)."""
    save_at_end: bool = True
    keep_last: int = 3
    """Keep the newest K complete checkpoints (0 = keep all)."""
    resume: str = "auto"
    """'auto' (latest complete checkpoint in dir, if any), 'none', or a checkpoint directory."""
    init_from: str | None = None
    """Start from these model weights (continued pretraining, fine-tuning): a Hugging Face export
    directory (``kla-convert megatron-to-hf``), a megatron checkpoint (a run's checkpoint root, an
    ``iter_*`` directory or its ``model/``; any TP/PP) or the paper's reference weights
    (.pt/.pth/.safetensors/.npz). Weights only: the optimizer, step counter, data position and LR
    schedule start fresh. Used only when there is nothing to resume: a run that finds its own
    checkpoint in ``dir`` resumes from it (so a requeued job continues instead of starting over)."""

    def __post_init__(self):
        if self.save_interval < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.save_interval and checkpoint.keep_last must be >= 0")
        if self.init_from is not None:
            if not self.init_from.strip():
                raise ValueError("checkpoint.init_from must be a path (or null), got an empty string")
            if not os.path.exists(self.init_from):
                raise ValueError(f"checkpoint.init_from: {self.init_from} does not exist (expected a Hugging Face "
                                 "export directory, a megatron checkpoint directory or reference weights "
                                 ".pt/.pth/.safetensors/.npz)")
            if self.resume not in ("auto", "none"):
                raise ValueError(f"checkpoint.init_from and checkpoint.resume={self.resume} exclude each other: "
                                 "init_from loads weights only into a fresh run, resume continues a run; set one")


@dataclass(kw_only=True)
class WandbConfig:
    enabled: bool = False
    project: str = "kla-megatron"
    mode: str = "offline"
    """'offline' (no account or network needed) or 'online'."""


@dataclass(kw_only=True)
class LoggingConfig:
    """The periodic log line and optional experiment trackers."""

    interval: int = 10
    """Print a log line every N steps."""
    peak_tflops: float | None = None
    """Peak dense bf16 TFLOP/s per device for MFU; None = detect (H100/H200: 989)."""
    tensorboard_dir: str | None = None
    """Write TensorBoard scalars here (off when None)."""
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self):
        _positive("logging", interval=self.interval)


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """Settings for ``engine: deepspeed`` (data parallel only)."""

    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_param: bool = False
    """CPU offload of parameters (ZeRO-3 only)."""

    def __post_init__(self):
        _one_of("deepspeed", "zero_stage", self.zero_stage, (0, 1, 2, 3))
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage 3")


@dataclass(kw_only=True)
class RunConfig:
    """One training run."""

    model: KLAModelConfig
    """The model's architecture. In YAML: a name in configs/models/, a path to a model YAML file,
    or a mapping of model config keys."""
    run_name: str = "run"
    engine: str = "megatron"
    """'megatron' (DDP + distributed optimizer, TP/PP/CP) or 'deepspeed' (ZeRO, data parallel only)."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1) with megatron's DistributedOptimizer."""
    overlap_grad_reduce: bool = True
    """Overlap the data-parallel gradient reduce with the backward pass."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def __post_init__(self):
        _one_of("run", "engine", self.engine, ("megatron", "deepspeed"))
        if self.engine == "deepspeed":
            p = self.parallel
            for name, value in (("tensor", p.tensor), ("pipeline", p.pipeline), ("context", p.context)):
                if value != 1:
                    raise ValueError(f"engine 'deepspeed' does not support parallel.{name}={value} "
                                     f"(data parallel only); use engine: megatron")
            if self.train.nan_policy == "skip":
                raise ValueError("engine 'deepspeed' does not support train.nan_policy 'skip' (DeepSpeed applies "
                                 "the update inside engine.step()); set train.nan_policy: abort")
            if self.checkpoint.init_from is not None:
                raise ValueError("engine 'deepspeed' does not support checkpoint.init_from; use engine: megatron")
        cp = self.parallel.context
        if cp > 1 and self.train.seq_length % (2 * cp):
            raise ValueError(f"parallel layout: train.seq_length {self.train.seq_length} is not divisible by "
                             f"2*context = {2 * cp} (context parallelism cuts every sequence into 2*CP equal "
                             f"chunks, megatron's load-balanced order); change train.seq_length or parallel.context")

    def runtime(self) -> KLARuntimeConfig:
        """How the model runs in this job: train.kla_backend, and train.recompute 'selective'
        recomputes the KLA scans in backward."""
        return KLARuntimeConfig(scan_backend=self.train.kla_backend, recompute_scan=self.train.recompute == "selective")

    def validate_world(self, world_size: int) -> int:
        """Check the layout and batch sizes against the world size; returns the data-parallel size."""
        p, t = self.parallel, self.train
        if world_size % p.model_parallel:
            raise ValueError(f"parallel layout: world size {world_size} is not divisible by "
                             f"tensor*pipeline*context = {p.tensor}*{p.pipeline}*{p.context} = {p.model_parallel}")
        dp = world_size // p.model_parallel
        if p.data is not None and p.data != dp:
            raise ValueError(f"parallel layout: parallel.data={p.data} but world size {world_size} / "
                             f"(tensor*pipeline*context={p.model_parallel}) gives data-parallel size {dp}")
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ValueError(f"batch sizes: global_batch_size {t.global_batch_size} is not divisible by "
                             f"micro_batch_size {t.micro_batch_size} * data-parallel size {dp}")
        if p.virtual_pipeline is not None and (t.global_batch_size // (t.micro_batch_size * dp)) % p.pipeline:
            raise ValueError("batch sizes: interleaved pipelining needs the number of micro-batches "
                             f"({t.global_batch_size // (t.micro_batch_size * dp)}) divisible by parallel.pipeline "
                             f"({p.pipeline})")
        return dp

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and overrides


def _type_check(key: str, tp, value, source: str):
    """Coerce YAML/--set values to the annotated type, or raise a clear error."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if tp is KLAModelConfig:
        return _model_config(key, value, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".", source)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, list):
            return value
    name = getattr(tp, "__name__", str(tp))
    raise ValueError(f"{key}: expected {name}, got {value!r}")


def _model_config(key: str, value, source: str) -> KLAModelConfig:
    """``model:`` as a name or path (loaded), a mapping of model keys, or a built config."""
    if isinstance(value, KLAModelConfig):
        return value
    if isinstance(value, dict):
        return KLAModelConfig.from_dict(value, f"{key} in {source}")
    if not isinstance(value, str):
        raise ValueError(f"{key}: expected a model config name, a YAML path or a mapping, got {value!r}")
    try:
        return load_model_config(value)
    except FileNotFoundError as exc:
        raise ValueError(f"{key}: {exc}") from None


def _model_keys(name_or_path: str) -> dict:
    """The keys a named model config's file sets (so ``--set model.x=...`` can change one)."""
    try:
        return read_model_yaml(model_config_path(name_or_path))
    except FileNotFoundError as exc:
        raise ValueError(f"model: {exc}") from None


def _build(cls, raw: dict, prefix: str = "", source: str = "the config"):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
            raise ValueError(f"unknown key '{prefix}{key}' in {source}{hint}")
    kwargs = {k: _type_check(prefix + k, hints[k], v, source) for k, v in raw.items()}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing required key '{prefix}{missing[0]}' in {source}")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr=3e-4' -> (['train', 'lr'], 3e-4); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"bad --set override {text!r}: expected KEY=VALUE, e.g. train.lr=3e-4")
    return key.strip().split("."), parse_yaml(value, f"--set {text!r}") if value.strip() else None



def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        if len(path) > 1 and path[0] == "model" and isinstance(raw.get("model"), str):
            raw["model"] = _model_keys(raw["model"])
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"bad --set override {text!r}: '{part}' is not a section")
        node[path[-1]] = value
    return raw


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or a bare name looked up as ``configs/<name>.yaml``."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or len(p.parts) > 1:
        if p.is_file():
            return p
        raise ValueError(f"run config {name_or_path!r}: no such file{_did_you_mean(p)}")
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    names = sorted(c.stem for c in CONFIG_DIR.glob("*.yaml"))
    raise ValueError(f"run config {name_or_path!r} not found: neither a file nor a name in {CONFIG_DIR} "
                     f"(names: {', '.join(names)})")


def _did_you_mean(path: Path) -> str:
    siblings = [c.name for c in path.parent.glob("*.y*ml")] if path.parent.is_dir() else []
    close = difflib.get_close_matches(path.name, siblings, n=1)
    return f"; did you mean {str(path.parent / close[0])!r}?" if close else ""


def load_run_config(name_or_path: str | None = None, overrides: list[str] = (), *, raw: dict | None = None) -> RunConfig:
    """Load a run config from YAML (or a dict), apply ``--set`` overrides, and validate it.

    Relative data/tokenizer/checkpoint paths stay relative to the working directory.
    """
    if raw is None:
        path = resolve_config_path(name_or_path)
        source = str(path)
        raw = parse_yaml(path.read_text(), source) or {}
    else:
        source = "the config"
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: expected a mapping at the top level")
    raw = apply_overrides(raw, list(overrides))
    if overrides:
        source += " / --set overrides"
    return _build(RunConfig, raw, "", source)
