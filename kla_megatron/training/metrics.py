"""The periodic log line (loss, lr, grad norm, tokens/s, TFLOP/s per device, MFU, memory) and
optional TensorBoard / wandb trackers (both off unless configured)."""
from __future__ import annotations

import os
import time

import torch

from .config import LoggingConfig

# Dense bf16 peak TFLOP/s per device (no sparsity), for MFU. H100 SXM and H200 share the same core.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def peak_tflops(cfg: LoggingConfig) -> float | None:
    """Configured peak, else the table entry matching the CUDA device name, else None (no MFU)."""
    if cfg.peak_tflops is not None:
        return cfg.peak_tflops
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in PEAK_TFLOPS.items():
            if key in name:
                return value
    return None


def memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class Throughput:
    """Tokens/s, achieved TFLOP/s per device and MFU over the steps since the last report."""

    def __init__(self, flops_per_token: float, world_size: int, peak: float | None):
        self.flops_per_token, self.world_size, self.peak = flops_per_token, world_size, peak
        self.tokens, self.t0 = 0, time.perf_counter()

    def pause(self) -> None:
        """Exclude validation and checkpointing time from the throughput."""
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        self.t0 += time.perf_counter() - self._paused_at

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def report(self) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tok_s = self.tokens / dt
        tflops = tok_s * self.flops_per_token / self.world_size / 1e12
        out = {"tokens_per_s": tok_s, "tflops_per_device": tflops}
        if self.peak:
            out["mfu"] = tflops / self.peak
        self.tokens, self.t0 = 0, time.perf_counter()
        return out


def format_line(step: int, total: int, m: dict) -> str:
    parts = [f"step {step}/{total}", f"loss {m['loss']:.4f}", f"lr {m['lr']:.3e}", f"grad_norm {m['grad_norm']:.3f}",
             f"tokens/s {m['tokens_per_s']:.0f}", f"TFLOP/s/device {m['tflops_per_device']:.3g}"]
    if "mfu" in m:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    parts.append(f"mem {m['mem_gib']:.2f}GiB")
    if m.get("skipped"):
        parts.append(f"skipped {m['skipped']}")
    return " | ".join(parts)


class Trackers:
    """TensorBoard and wandb writers on the logging rank; no-ops when disabled."""

    def __init__(self, cfg: LoggingConfig, run_name: str, config_dict: dict, enabled: bool):
        self.tb = self.wandb = None
        if not enabled:
            return
        if cfg.tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ValueError("logging.tensorboard_dir is set but tensorboard is not installed: "
                                 "pip install 'kla-megatron[tensorboard]'") from exc
            self.tb = SummaryWriter(cfg.tensorboard_dir)
        if cfg.wandb.enabled:
            import wandb

            self.wandb = wandb.init(project=cfg.wandb.project, name=run_name, mode=cfg.wandb.mode,
                                    config=config_dict)

    def log(self, metrics: dict, step: int) -> None:
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
