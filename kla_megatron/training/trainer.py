"""The training loop: set up, resume, then step / log / validate / checkpoint until done or preempted.

The loop is engine-agnostic; an engine (megatron or DeepSpeed) provides ``train_step``,
``eval_loss``, ``save`` and ``load``. The trainer itself checkpoints only the step, the number
of consumed samples, the layout and the RNG states.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from kla_megatron.parallel.local_ranks import free_port

from kla_megatron.checkpoint import directory as ckpt
from .config import RunConfig
from .data import build_datasets, rank_micro_batches
from .metrics import Throughput, Trackers, format_line, memory_gib, peak_tflops
from .model_factory import enable_cpu_megatron, model_config, models_api
from .preemption import PreemptionHandler


class NonFiniteError(RuntimeError):
    """Raised under nan_policy 'abort' (or too many skipped steps); no checkpoint is written."""


@dataclass
class History:
    losses: dict[int, float] = field(default_factory=dict)
    """step (1-based count of steps done) -> training loss of that step."""
    valid: dict[int, float] = field(default_factory=dict)
    grad_norms: dict[int, float] = field(default_factory=dict)
    resumed_from: str | None = None
    start_step: int = 0
    final_step: int = 0
    stopped_by_signal: bool = False
    last_checkpoint: str | None = None
    metrics: dict = field(default_factory=dict)
    already_complete: bool = False
    """The resumed checkpoint was already at the last step: nothing was trained or saved."""


@dataclass
class _Loop:
    """What the training loop carries from one step to the next."""

    meter: Throughput
    preempt: PreemptionHandler
    last: int
    """The step to stop after (train.exit_at_step or train.steps)."""
    skipped_in_a_row: int = 0
    skipped_total: int = 0
    interval_losses: list[float] = field(default_factory=list)
    """Losses of the finite steps since the last log line."""


def init_distributed() -> None:
    """Join the process group torchrun/srun set up, or make a one-rank group for a plain run."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:  # plain srun: map SLURM_* ourselves
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_NTASKS"],
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        if os.environ["WORLD_SIZE"] != "1":
            raise ValueError("MASTER_PORT is not set: launch multi-rank runs with torchrun or srun")
        os.environ["MASTER_PORT"] = str(free_port())  # a plain one-process run: any free port
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class Trainer:
    lock: ckpt.RunLock | None = None
    """The hold on checkpoint.dir (rank 0), taken by ``kla_megatron.train.run``; released by close()."""

    def __init__(self, run: RunConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        self.run = run
        init_distributed()
        enable_cpu_megatron()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dp = run.validate_world(self.world)
        t, p = run.train, run.parallel
        if t.deterministic:
            torch.use_deterministic_algorithms(True)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        if run.engine == "megatron":
            ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor, pipeline_model_parallel_size=p.pipeline,
                                         virtual_pipeline_model_parallel_size=p.virtual_pipeline,
                                         context_parallel_size=p.context)
        else:
            ps.initialize_model_parallel()
        self.dp_rank = ps.get_data_parallel_rank()
        torch.manual_seed(t.seed)
        model_parallel_cuda_manual_seed(t.seed)
        self.model_cfg = model_config(run)
        cached = " (index files are cached for the next run)" if run.data.kind != "mock" else " (mock)"
        with self._phase("building datasets" + cached):
            self.datasets = build_datasets(run, self.model_cfg.vocab_size)
        with self._phase(f"building the model and optimizer ({run.engine})"):
            if run.engine == "megatron":
                from .megatron_engine import MegatronEngine

                self.engine = MegatronEngine(run, self.model_cfg, self.datasets.eod_id)
            else:
                from .deepspeed_engine import DeepSpeedEngine

                self.engine = DeepSpeedEngine(run, self.model_cfg, self.datasets.eod_id)
        self.layout = {"tensor": p.tensor, "pipeline": p.pipeline, "context": p.context, "data": self.dp,
                       "virtual_pipeline": p.virtual_pipeline, "engine": run.engine}
        self.trackers = Trackers(run.logging, run.run_name, run.to_dict(), enabled=self.rank == 0)
        self.history = History()
        self.step = 0
        self.consumed_samples = 0
        """Data position: training samples consumed so far (a resumed run may change the batch size)."""

    # ------------------------------------------------------------------ helpers

    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    @contextlib.contextmanager
    def _phase(self, what: str):
        """One line before a start-up phase and its duration after, so a slow start is not silence."""
        self.log(f"{what} ...")
        start = time.perf_counter()
        yield
        self.log(f"{what.split(' (')[0]}: done in {time.perf_counter() - start:.1f} s")

    def _global_batch(self) -> list[dict]:
        return rank_micro_batches(self.datasets.train, self.consumed_samples, self.run, self.dp_rank, self.dp)

    def _validate(self) -> float:
        t = self.run.train
        batches = [rank_micro_batches(self.datasets.valid, i * t.global_batch_size, self.run, self.dp_rank, self.dp)
                   for i in range(t.eval_iters)]
        return self.engine.eval_loss(batches)

    # ------------------------------------------------------------------ checkpoints

    def resume(self) -> None:
        """Load the checkpoint to continue from: ``checkpoint.resume``, or with 'auto' the newest in
        ``checkpoint.dir`` that passes ckpt.check and loads. Each one skipped gets one line saying
        why; CheckpointError if checkpoints exist but none loads."""
        c = self.run.checkpoint
        if c.resume == "none" or (c.resume == "auto" and not c.dir):
            return
        if c.resume != "auto":
            problem = self._load_checkpoint(c.resume)
            if problem:
                raise ckpt.CheckpointError(f"checkpoint.resume: cannot resume from {c.resume}: {problem}")
            return
        skipped = []
        for _, path in ckpt.candidates(c.dir):
            problem = self._load_checkpoint(path)
            if problem is None:
                return
            skipped.append(path)
            if self.rank == 0:
                ckpt.notice(f"skipping checkpoint {path}: {problem}")
        if skipped:
            raise ckpt.CheckpointError(
                f"none of the {len(skipped)} checkpoint(s) in {c.dir} can be loaded (see the lines above); "
                "move them away, point checkpoint.resume at a good one, or set checkpoint.resume=none to start over")

    def _load_checkpoint(self, path: str) -> str | None:
        """Collective: load ``path``; None on success, else why it cannot be loaded (one line).
        Raises ValueError where the run config, not the checkpoint, is the problem."""
        problem = ckpt.check(path)
        if problem:
            return problem
        manifest = ckpt.read_manifest(path)
        saved = manifest.get("layout", {})
        if saved.get("engine", "megatron") != self.run.engine:
            raise ValueError(f"checkpoint.resume: {path} was written by engine '{saved.get('engine')}', "
                             f"this run uses engine '{self.run.engine}'")
        if self.run.engine == "deepspeed" and saved != self.layout:
            raise ValueError(f"engine 'deepspeed' does not support resuming under a different layout "
                             f"({saved} -> {self.layout}); resume with the same data-parallel size")
        same_layout = manifest.get("layout") == self.layout
        failure = None
        try:
            common = self.engine.load(os.path.join(path, "model"))
            step, consumed = int(common["step"]), int(common["consumed_samples"])
            if same_layout:
                ckpt.load_rng(path, self.rank)
        except ckpt.CAUGHT as exc:  # a checkpoint that passed the checks but does not load (older ones)
            failure = f"it does not load ({ckpt.one_line(exc)})"
        if dist.is_initialized():  # every rank skips it if any rank failed
            failures = [None] * self.world
            dist.all_gather_object(failures, failure)
            failure = next((f for f in failures if f), None)
        if failure:
            return failure
        self.step, self.consumed_samples = step, consumed
        self.history.resumed_from, self.history.start_step = path, self.step
        self.log(f"resumed from {path} at step {self.step}"
                 + ("" if same_layout else f" (layout {manifest.get('layout')} -> {self.layout}; RNG re-seeded)"))
        return None

    def save(self) -> str | None:
        c = self.run.checkpoint
        if not c.dir or self.step == 0:
            return None
        if self.history.resumed_from == ckpt.step_dir(c.dir, self.step) and self.step == self.history.start_step:
            return self.history.resumed_from  # nothing changed since it was loaded: leave it as it is
        tmp = ckpt.begin(c.dir, self.step, self.lock)
        failure = None
        try:
            common = {"step": self.step, "consumed_samples": self.consumed_samples}
            self.engine.save(os.path.join(tmp, "model"), common)
            ckpt.save_rng(tmp, self.rank)
            if self.rank == 0:
                # The architecture travels with the weights: kla-convert reads it from here.
                models_api().save_model_config(self.model_cfg, tmp)
        except ckpt.CAUGHT as exc:  # a full disk above all: every rank agrees, the partial save goes
            failure = exc
        ckpt.finish_writes(c.dir, self.step, failure)
        path = ckpt.commit(c.dir, self.step, {"layout": self.layout, "run_name": self.run.run_name}, c.keep_last)
        self.history.last_checkpoint = path
        self.log(f"saved checkpoint {path}")
        return path

    # ------------------------------------------------------------------ loop

    def train(self) -> History:
        """Resume (or take init_from weights), then step until train.steps (or exit_at_step) or a
        signal; each step: skip or abort a non-finite one, log, validate, checkpoint."""
        self.resume()
        from kla_megatron.checkpoint.init_from import init_from_weights
        init_from_weights(self)  # checkpoint.init_from: weights only, when nothing was resumed
        if self._resumed_at_the_end():
            return self.history
        self._banner()
        started, start_step = time.perf_counter(), self.step
        t = self.run.train
        meter = Throughput(models_api().flops_per_token(self.model_cfg, t.seq_length), self.world,
                           peak_tflops(self.run.logging))
        loop = _Loop(meter=meter, preempt=PreemptionHandler(), last=t.exit_at_step or t.steps)
        try:
            self._run_steps(loop)
        finally:
            loop.preempt.restore()
        self.history.final_step = self.step
        self._summary(time.perf_counter() - started, self.step - start_step)
        return self.history

    def _resumed_at_the_end(self) -> bool:
        """Whether the resumed checkpoint is already at the last step (then say so: nothing to do)."""
        t, h = self.run.train, self.history
        if not (h.resumed_from and self.step >= (t.exit_at_step or t.steps)):
            return False
        reached = "the run is complete" if self.step >= t.steps else f"train.exit_at_step={t.exit_at_step} is reached"
        self.log(f"{reached}: {h.resumed_from} is at step {self.step} of {t.steps}; nothing to do "
                 "(raise train.steps to train further)")
        h.already_complete, h.final_step, h.last_checkpoint = True, self.step, h.resumed_from
        return True

    def _run_steps(self, loop: _Loop) -> None:
        if self.step < loop.last:
            self.log(f"step {self.step + 1} runs first-use work (kernel compilation, "
                     "autotuning); the first log line may take a while")
        while self.step < loop.last:
            result = self._train_step(loop)
            self._skip_or_abort(result, loop)
            self._log_interval(result, loop)
            self._validate_interval(loop)
            if self._stop_on_signal(loop):
                return
            self._save_interval(loop)
        if self.run.checkpoint.save_at_end:
            self.save()

    def _train_step(self, loop: _Loop):
        """One optimizer step on the next global batch; advances the step and the data position."""
        t = self.run.train
        result = self.engine.train_step(self._global_batch(), self.step)
        self.step += 1
        self.consumed_samples += t.global_batch_size
        loop.meter.add(t.global_batch_size * t.seq_length)
        return result

    def _skip_or_abort(self, result, loop: _Loop) -> None:
        """A non-finite step is skipped, or aborts the run (nan_policy 'abort', or more than
        max_skipped_steps in a row); a finite one is recorded."""
        t = self.run.train
        if not result.skipped:
            loop.skipped_in_a_row = 0
            self.history.losses[self.step] = result.loss
            self.history.grad_norms[self.step] = result.grad_norm
            loop.interval_losses.append(result.loss)
            return
        loop.skipped_in_a_row += 1
        loop.skipped_total += 1
        msg = f"step {self.step}: non-finite loss or gradient (loss {result.loss})"
        if t.nan_policy == "abort" or loop.skipped_in_a_row > t.max_skipped_steps:
            raise NonFiniteError(msg + "; aborting, the last good checkpoint is left intact")
        self.log(msg + "; step skipped")

    def _log_interval(self, result, loop: _Loop) -> None:
        """Every logging.interval steps and at the last: the mean loss since the last line and the rest."""
        t = self.run.train
        if not (self.step % self.run.logging.interval == 0 or self.step == t.steps):
            return
        m = {"loss": sum(loop.interval_losses) / max(1, len(loop.interval_losses)), "lr": result.lr,
             "grad_norm": result.grad_norm, "mem_gib": memory_gib(), "skipped": loop.skipped_total,
             **loop.meter.report()}
        loop.interval_losses = []
        self.history.metrics = m
        self.log(format_line(self.step, t.steps, m))
        self.trackers.log({f"train/{k}": v for k, v in m.items()}, self.step)

    def _validate_interval(self, loop: _Loop) -> None:
        """Every train.eval_interval steps and at the last (off the throughput clock)."""
        t = self.run.train
        if not (t.eval_interval and (self.step % t.eval_interval == 0 or self.step == t.steps)):
            return
        loop.meter.pause()
        v = self._validate()
        loop.meter.resume()
        self.history.valid[self.step] = v
        self.log(f"step {self.step}/{t.steps} | validation loss {v:.4f}")
        self.trackers.log({"valid/loss": v}, self.step)

    def _stop_on_signal(self, loop: _Loop) -> bool:
        """A preemption signal on any rank: checkpoint now and stop."""
        if not loop.preempt.should_stop():
            return False
        self.log(f"received signal {loop.preempt.received or '(on another rank)'}: "
                 f"checkpointing at step {self.step} and exiting")
        self.history.stopped_by_signal = True
        self.save()
        return True

    def _save_interval(self, loop: _Loop) -> None:
        """Every checkpoint.save_interval steps before the last (the last one saves after the loop)."""
        c = self.run.checkpoint
        if c.save_interval and self.step % c.save_interval == 0 and self.step < loop.last:
            loop.meter.pause()
            self.save()
            loop.meter.resume()

    def _banner(self) -> None:
        """What runs, on what, from where: one block before the first step."""
        run, t, m = self.run, self.run.train, self.model_cfg
        params = f", {models_api().num_parameters(m) / 1e6:.1f}M parameters"
        L = self.layout
        data = "mock data" if run.data.kind == "mock" else f"data {', '.join(map(str, run.data.blend))}"
        start = (f"resumed from {self.history.resumed_from} at step {self.step}" if self.history.resumed_from
                 else f"weights from {run.checkpoint.init_from}, step 0" if run.checkpoint.init_from
                 else "fresh start")
        self.log(f"run {run.run_name}: model {m.name} ({m.layer_pattern}, d {m.hidden_size}{params}) | "
                 f"tensor {L['tensor']} x pipeline {L['pipeline']} x context {L['context']} x data {L['data']} "
                 f"({L['engine']}) | seq {t.seq_length}, global batch {t.global_batch_size}, {t.steps} steps | "
                 f"{data} | checkpoints {run.checkpoint.dir or '(none)'} | {start}")

    def _summary(self, seconds: float, steps: int) -> None:
        t, h = self.run.train, self.history
        tokens = steps * t.global_batch_size * t.seq_length
        last = max(h.losses) if h.losses else None
        loss = f", last step loss {h.losses[last]:.4f}" if last else ""
        valid = f", validation loss {h.valid[max(h.valid)]:.4f}" if h.valid else ""
        saved = f"; checkpoint {h.last_checkpoint}" if h.last_checkpoint else ""
        self.log(f"done: {steps} steps to step {self.step}/{t.steps}: {tokens:,} tokens in "
                 f"{seconds:.1f} s{loss}{valid}{saved}")

    def close(self, barrier: bool = True) -> None:
        from megatron.core import parallel_state as ps

        self.trackers.close()
        if barrier and dist.is_initialized():
            dist.barrier()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        ps.destroy_model_parallel()
