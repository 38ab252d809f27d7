"""Run megatron-core 0.16.x on a CPU-only machine with the gloo backend.

megatron-core hard-codes CUDA in many places (``torch.cuda.current_device()`` passed as
``device=``, ``device="cuda"`` literals in the pipeline schedules, the CUDA RNG tracker,
streams/events in DDP, ``param.type() == 'torch.cuda.FloatTensor'`` checks in the
optimizer, a CUDA causal mask, and ``WrappedTorchNorm`` refusing sequence parallelism).
``enable_cpu_megatron()`` routes each of those to the CPU so that the model, the tensor-
and sequence-parallel linears, the pipeline schedules, DDP / DistributedOptimizer and
``dist_checkpointing`` save/load run with gloo (checked against single-process runs in
``tests/test_model_parallel.py``).

It is idempotent and does nothing when CUDA is available unless ``force=True`` (on a GPU
machine megatron's own CUDA paths are the right ones). Call it before building models.
Every shim counts the call site that reached it (``cpu_shim_hits()``), so a test or a
developer can see which CUDA-only code paths a run exercised.

What each shim does and why (see ``_SHIMS``):

- ``current_device``: ``torch.cuda.current_device()`` returns ``"cpu"``; megatron uses it
  as the ``device=`` of parameters, buffers and communication buffers.
- ``synchronize``, ``streams``, ``nvtx``: no-ops / dummy objects (DDP grad buckets, the
  schedules and timers touch them; the CPU has one implicit stream).
- ``rng``: CUDA RNG state get/set/seed go to the CPU generator, so
  ``model_parallel_cuda_manual_seed`` and the RNG tracker (dropout, recompute) work.
- ``tensor_cuda``: ``Tensor.cuda()`` returns the tensor itself.
- ``device_mode``: a ``TorchFunctionMode`` rewrites ``device="cuda"`` arguments and
  ``.to("cuda")`` to the CPU, and makes a CPU tensor's ``.type()`` report
  ``torch.cuda.*`` (the optimizer selects fp32 / bf16 groups by comparing those strings).
  The mode is pushed once for the calling (main) thread.
- ``causal_mask``: a CPU ``get_default_causal_mask`` (used when ``attention_mask=None``).
- ``torch_norm_sp``: ``WrappedTorchNorm`` accepts ``sequence_parallel=True``. A per-token
  norm is exact under SP; its weights are tagged ``sequence_parallel`` so that
  ``finalize_model_grads`` all-reduces their gradients over the TP group, exactly what
  TE / apex norms do.
"""
from __future__ import annotations

import collections
import sys
from typing import Dict, Tuple

import torch

_HITS: "collections.Counter[Tuple[str, str]]" = collections.Counter()
_ENABLED = False
_MODE = None


def cpu_shim_hits() -> Dict[Tuple[str, str], int]:
    """``{(shim, "megatron/file.py:line"): count}`` of the CUDA-only call sites reached."""
    return dict(_HITS)


def _call_site() -> str:
    frame = sys._getframe(2)
    while frame is not None and (
        frame.f_code.co_filename == __file__
        or "/torch/" in frame.f_code.co_filename
        or frame.f_code.co_filename.endswith("contextlib.py")
    ):
        frame = frame.f_back
    if frame is None:
        return "?"
    name = frame.f_code.co_filename.split("site-packages/")[-1]
    return f"{name}:{frame.f_lineno}"


def _record(shim: str) -> None:
    _HITS[(shim, _call_site())] += 1


class _DummyEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _DummyStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _DummyEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _shim_current_device():
    def current_device():
        _record("torch.cuda.current_device")
        return "cpu"

    torch.cuda.current_device = current_device


def _shim_synchronize():
    def synchronize(*args, **kwargs):
        _record("torch.cuda.synchronize")

    torch.cuda.synchronize = synchronize


def _shim_rng():
    import megatron.core.tensor_parallel.random as mrandom

    def get_rng_state(*args, **kwargs):
        _record("torch.cuda.get_rng_state")
        return torch.get_rng_state()

    def set_rng_state(state, *args, **kwargs):
        _record("torch.cuda.set_rng_state")
        torch.set_rng_state(state)

    def manual_seed(seed):
        _record("torch.cuda.manual_seed")
        torch.manual_seed(seed)

    for mod in (torch.cuda, torch.cuda.random):
        mod.get_rng_state, mod.set_rng_state, mod.manual_seed = get_rng_state, set_rng_state, manual_seed

    # megatron's private helpers poke torch.cuda.default_generators directly.
    def _get_cuda_rng_state(device="cuda", clone=False, graph_safe=False):
        _record("megatron _get_cuda_rng_state")
        return torch.get_rng_state()

    def _set_cuda_rng_state(new_state, device=-1, graph_safe=False):
        _record("megatron _set_cuda_rng_state")
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = _get_cuda_rng_state
    mrandom._set_cuda_rng_state = _set_cuda_rng_state


def _shim_tensor_cuda():
    def cuda(self, *args, **kwargs):
        _record("Tensor.cuda")
        return self

    torch.Tensor.cuda = cuda


def _shim_streams():
    class Stream(_DummyStream):
        def __init__(self, *args, **kwargs):
            _record("torch.cuda.Stream")

    class Event(_DummyEvent):
        def __init__(self, *args, **kwargs):
            _record("torch.cuda.Event")

    def current_stream(*args, **kwargs):
        _record("torch.cuda.current_stream")
        return _DummyStream()

    torch.cuda.current_stream = current_stream
    torch.cuda.default_stream = current_stream
    torch.cuda.Stream = Stream
    torch.cuda.Event = Event
    torch.cuda.stream = lambda *args, **kwargs: _DummyStream()


def _shim_nvtx():
    torch.cuda.nvtx.range_push = lambda *args, **kwargs: _record("torch.cuda.nvtx.range_push")
    torch.cuda.nvtx.range_pop = lambda *args, **kwargs: _record("torch.cuda.nvtx.range_pop")


def _names_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _shim_device_mode():
    # String literals such as `torch.zeros(..., device="cuda")` in the pipeline schedules
    # cannot be reached by patching a function: intercept them at the torch-function level.
    from torch.overrides import TorchFunctionMode

    class CudaToCpuMode(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = getattr(func, "__name__", "")
            if "device" in kwargs and _names_cuda(kwargs["device"]):
                _record(f"device='cuda' in {name}")
                kwargs = dict(kwargs, device="cpu")
            elif name == "to" and len(args) > 1 and _names_cuda(args[1]):
                _record("Tensor.to('cuda')")
                args = (args[0], "cpu") + tuple(args[2:])
            elif (
                name == "type"
                and len(args) == 1
                and not kwargs
                and isinstance(args[0], torch.Tensor)
                and args[0].device.type == "cpu"
            ):
                # optimizer.py / distrib_optimizer.py / clip_grads.py compare
                # param.type() with 'torch.cuda.FloatTensor' and friends.
                _record("Tensor.type() -> 'torch.cuda.*'")
                return func(*args).replace("torch.", "torch.cuda.", 1)
            return func(*args, **kwargs)

    global _MODE
    _MODE = CudaToCpuMode()
    _MODE.__enter__()  # stays pushed for the calling thread for the rest of the process


def _shim_causal_mask():
    import megatron.core.fusions.fused_softmax as fused_softmax
    import megatron.core.transformer.utils as transformer_utils

    def get_default_causal_mask(sq: int) -> torch.Tensor:
        _record("get_default_causal_mask")
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    transformer_utils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask


def _shim_torch_norm_sp():
    from megatron.core.transformer import torch_norm

    original_new = torch_norm.WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, eps=1e-5, *args, **kwargs):
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, eps, *args, **kwargs)
        _record("WrappedTorchNorm(sequence_parallel=True)")
        config.sequence_parallel = False  # only to pass the constructor's assert
        try:
            norm = original_new(cls, config, hidden_size, eps, *args, **kwargs)
        finally:
            config.sequence_parallel = True
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    torch_norm.WrappedTorchNorm.__new__ = __new__


_SHIMS = {
    "current_device": _shim_current_device,
    "synchronize": _shim_synchronize,
    "rng": _shim_rng,
    "tensor_cuda": _shim_tensor_cuda,
    "streams": _shim_streams,
    "nvtx": _shim_nvtx,
    "device_mode": _shim_device_mode,
    "causal_mask": _shim_causal_mask,
    "torch_norm_sp": _shim_torch_norm_sp,
}


def enable_cpu_megatron(force: bool = False) -> bool:
    """Make megatron-core's CUDA-only code paths run on the CPU (see the module docstring).

    Returns True when the shims are active (now or from an earlier call). With CUDA
    available it does nothing and returns False, unless ``force=True``.
    """
    global _ENABLED
    if _ENABLED:
        return True
    if torch.cuda.is_available() and not force:
        return False
    for shim in _SHIMS.values():
        shim()
    _ENABLED = True
    return True
