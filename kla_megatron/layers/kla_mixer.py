"""The multi-head KLA mixer (docs/kla.md#layer) as a megatron-core module.

    x [s, b, D] → in_proj (ColumnParallel) → z, gate        each [s, b, d_inner/TP]
    z → causal depthwise conv → SiLU                         (one kernel: ops/conv)
    z → per-head (block-diagonal) sensor projection → v, log σ²_v, k, q   (one batched matmul)
        Λv = 1/(softplus(log σ²_v) + 1e-4);  k, q L2-normalised over the state   (ops/kla/sensors.py)
    (ā, p̄) = discretize(A_log, Δ_raw, p)                     [H, P, S] fp32
    y, y_var = kla_scan(v, Λv, k, q, ā, p̄)                   I/O in z's dtype, fp32 state
    y = (y + λ_skip·z) · SiLU(gate);   y_var = y_var · SiLU(gate)²        (ops/kla/gate.py)
    out = out_proj(y)  (RowParallel: one all-reduce, or reduce-scatter under SP)

d_inner is split into H heads of P = d_inner/H channels; tensor parallelism gives each rank
H/TP whole heads, so everything between the two projections is local to the rank.
With H = 1 this is the reference ``kla`` v0.1.0 ``KLALayer`` (checked by
``tests/test_golden.py``; parameter names in ``kla_megatron/models/reference_names.py``).

Parameter attributes read by the optimizer set-up: ``no_weight_decay`` (True on the SSM
parameters, λ_skip and the conv bias) and ``lr_mult`` (the SSM learning-rate multiplier on
A_log, Δ_raw and p). A_log, Δ_raw, p and λ_skip stay fp32 when the model is cast to
bf16/fp16 (``_apply``), and the sensors, discretisation and scan always run in fp32.

Shapes (local to a TP rank): H heads (H/TP here), P = d_inner/H channels per head, S states.
``in_proj.weight`` [2·H·P, D] ([z | gate]); ``conv_weight`` [H·P, 1, K], ``conv_bias`` [H·P];
``sensor_weight`` [H, O, P] with O = w_v + w_var + 2S (plain: w_v = w_var = P; mamba:
w_v = 0, w_var = var_rank/H) emitting [v | log σ²_v | k | q]; ``var_expand`` [H, P, w_var]
(mamba only); ``A_log``, ``delta_raw``, ``p`` [H, P, S]; ``lambda_skip`` []; ``out_proj.weight``
[D, H·P].

The causal conv (``causal_conv``) and the scan (``scan``) are single methods on purpose: the
context-parallel helper replaces exactly these two calls (halo exchange, carry exchange).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import (
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
    sharded_state_dict_default,
)
from megatron.core.utils import divide

from kla_megatron.ops.conv import causal_conv1d
from kla_megatron.ops import kla_core
from kla_megatron.ops.kla import kla_decode_step
from kla_megatron.ops.kla.gate import gated_output
from kla_megatron.ops.kla.sensors import sensor_activations
from kla_megatron.parallel.kla_context_parallel import KLAContextParallel

from .inference_state import KLALayerState
from .runtime import KLARuntimeConfig
from .sharded_state import split_sharded_tensor

PRESETS = ("plain", "mamba")


@dataclass(kw_only=True)
class KLAMixerConfig:
    """KLA-specific architecture of one mixer (the rest comes from ``TransformerConfig``; how it
    runs, from ``KLARuntimeConfig``)."""

    num_heads: int = 1
    """H: d_inner is split into H heads with their own k, q; TP splits heads."""
    d_state: int = 16
    """S: state size per channel."""
    expand: float = 2.0
    """d_inner = int(expand · hidden_size)."""
    conv_kernel: int = 4
    """Width of the causal depthwise conv (≥ 1)."""
    preset: str = "plain"
    """"plain": v and log σ²_v at full width; "mamba": v = z, log σ²_v low rank."""
    var_rank: Optional[int] = None
    """Rank of the "mamba" variance bottleneck (all heads together); default ceil(D/8).
    Each head gets var_rank/H."""
    ssm_lr_mult: float = 0.1
    """Learning-rate multiplier the optimizer applies to A_log, Δ_raw, p."""
    dt_min: float = kla_core.DT_MIN
    """Δ initialisation: log-uniform in [dt_min, dt_max] ..."""
    dt_max: float = kla_core.DT_MAX
    """... upper end of that range."""
    dt_init_floor: float = kla_core.DT_INIT_FLOOR
    """... and Δ is floored here before being stored pre-softplus."""
    p_init: float = kla_core.P_INIT
    """Initial continuous process noise p (the reference's `process_noise_scale`)."""
    lambda_skip_init: float = kla_core.LAMBDA_SKIP_INIT
    """Initial λ_skip (scalar skip weight from the post-conv stream)."""

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"KLAMixerConfig.preset must be one of {PRESETS}, got {self.preset!r}")
        if self.num_heads < 1 or self.d_state < 1 or self.conv_kernel < 1:
            raise ValueError(
                "KLAMixerConfig: num_heads, d_state and conv_kernel must be ≥ 1, got "
                f"{self.num_heads}, {self.d_state}, {self.conv_kernel}"
            )

    def d_inner(self, hidden_size: int) -> int:
        return int(self.expand * hidden_size)

    def resolved_var_rank(self, hidden_size: int) -> int:
        return self.var_rank if self.var_rank is not None else math.ceil(hidden_size / 8)

    def validate(self, hidden_size: int, tp_size: int = 1) -> None:
        """Shape checks that need the model width and the TP size (fail at construction)."""
        d_inner = self.d_inner(hidden_size)
        if d_inner % self.num_heads:
            raise ValueError(
                f"KLA: d_inner = expand·hidden_size = {d_inner} is not divisible by the number of "
                f"KLA heads {self.num_heads}; choose kla_heads dividing {d_inner} (or change expand)"
            )
        if self.num_heads % tp_size:
            raise ValueError(
                f"KLA: the number of KLA heads ({self.num_heads}) must be divisible by the tensor "
                f"parallel size ({tp_size}) so that each rank owns whole heads; set kla_heads to a "
                f"multiple of {tp_size} or lower tensor_model_parallel_size"
            )
        if self.preset == "mamba" and self.resolved_var_rank(hidden_size) % self.num_heads:
            raise ValueError(
                f"KLA: var_rank {self.resolved_var_rank(hidden_size)} must be divisible by the "
                f"number of KLA heads {self.num_heads}; set kla_var_rank accordingly"
            )


@dataclass
class KLAMixerSubmodules:
    """Linear layers of the mixer (specs choose local or TE implementations)."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None


def _mark(param: torch.nn.Parameter, *, tp_dim: Optional[int], no_wd: bool, lr_mult: float = 1.0):
    if tp_dim is not None:
        param.tensor_model_parallel = True
        param.partition_dim = tp_dim
        param.partition_stride = 1
    param.no_weight_decay = no_wd
    param.lr_mult = lr_mult


class KLAMixer(MegatronModule):
    """Multi-head KLA sequence mixer. ``forward`` takes and returns ``[s, b, h]``
    (``s/TP`` under sequence parallelism) and returns ``(out, bias)`` like megatron mixers.
    """

    def __init__(
        self,
        config: TransformerConfig,
        submodules: KLAMixerSubmodules,
        mixer_config: KLAMixerConfig,
        runtime: Optional[KLARuntimeConfig] = None,
        layer_number: int = 1,
        pg_collection=None,
    ):
        super().__init__(config)
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups()
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        self.tp_size = self.tp_group.size()
        self.tp_rank = self.tp_group.rank()
        self.runtime = runtime or KLARuntimeConfig()
        # Context parallelism: the sequence is sharded in megatron's load-balanced order; the
        # scan and the conv exchange carries/halos over this group (kla_megatron.parallel).
        self.cp = KLAContextParallel(getattr(pg_collection, "cp", None))
        self.mc = mixer_config
        self.layer_number = layer_number
        mc, D = mixer_config, config.hidden_size
        mc.validate(D, self.tp_size)

        self.d_inner = mc.d_inner(D)
        self.num_heads = mc.num_heads
        self.head_dim = self.d_inner // mc.num_heads
        self.d_state = mc.d_state
        self.num_heads_local = divide(mc.num_heads, self.tp_size)
        self.d_inner_local = self.num_heads_local * self.head_dim
        P, S = self.head_dim, self.d_state
        if mc.preset == "plain":
            self.w_v, self.w_var = P, P
        else:
            self.w_v, self.w_var = 0, mc.resolved_var_rank(D) // mc.num_heads
        self.sensor_width = self.w_v + self.w_var + 2 * S

        # stride=2: the full weight is [z | gate] and rank r holds [z_r | gate_r] (same
        # convention as megatron's SwiGLU fc1), so initialisation is TP-invariant.
        self.in_proj = build_module(
            submodules.in_proj,
            D,
            2 * self.d_inner,
            config=config,
            init_method=config.init_method,
            gather_output=False,
            bias=False,
            skip_bias_add=False,
            is_expert=False,
            stride=2,
            tp_comm_buffer_name="fc1",
            tp_group=self.tp_group,
        )
        self.out_proj = build_module(
            submodules.out_proj,
            self.d_inner,
            D,
            config=config,
            init_method=config.output_layer_init_method,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=True,
            is_expert=False,
            tp_comm_buffer_name="fc2",
            tp_group=self.tp_group,
        )
        self._init_own_parameters()

    # ------------------------------------------------------------------ parameters

    def _local_heads(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a tensor whose dim 0 is heads (or head-major channels)."""
        n = full.shape[0] // self.tp_size
        return full[self.tp_rank * n : (self.tp_rank + 1) * n].clone()

    def _new_param(self, full: torch.Tensor, dtype=None) -> torch.nn.Parameter:
        # Own parameters are drawn at full size on the CPU generator and sliced, so the
        # model is the same function for every TP size (TP ranks share the CPU seed).
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        return torch.nn.Parameter(self._local_heads(full).to(device=device, dtype=dtype or self.config.params_dtype))

    def _init_own_parameters(self) -> None:
        mc, H, P, S, K = self.mc, self.num_heads, self.head_dim, self.d_state, self.mc.conv_kernel
        std = self.config.init_method_std
        fp32 = torch.float64 if self.config.params_dtype == torch.float64 else torch.float32

        bound = 1.0 / math.sqrt(K)  # nn.Conv1d's default for a depthwise conv
        self.conv_weight = self._new_param(torch.empty(H * P, 1, K).uniform_(-bound, bound))
        self.conv_bias = self._new_param(torch.zeros(H * P))
        _mark(self.conv_weight, tp_dim=0, no_wd=False)
        _mark(self.conv_bias, tp_dim=0, no_wd=True)

        self.sensor_weight = self._new_param(torch.randn(H, self.sensor_width, P) * std)
        _mark(self.sensor_weight, tp_dim=0, no_wd=False)
        if mc.preset == "mamba":
            self.var_expand = self._new_param(torch.randn(H, P, self.w_var) * std)
            _mark(self.var_expand, tp_dim=0, no_wd=False)
        else:
            self.var_expand = None

        delta_raw = kla_core.initial_delta_raw((H, P, S), mc.dt_min, mc.dt_max, mc.dt_init_floor)
        self.delta_raw = self._new_param(delta_raw, dtype=fp32)
        self.A_log = self._new_param(torch.zeros(H, P, S), dtype=fp32)
        self.p = self._new_param(torch.full((H, P, S), mc.p_init), dtype=fp32)
        for name in ("delta_raw", "A_log", "p"):
            _mark(getattr(self, name), tp_dim=0, no_wd=True, lr_mult=mc.ssm_lr_mult)
        device = "cpu" if self.config.use_cpu_initialization else torch.cuda.current_device()
        self.lambda_skip = torch.nn.Parameter(torch.full((), mc.lambda_skip_init, dtype=fp32, device=device))
        _mark(self.lambda_skip, tp_dim=None, no_wd=True)

    _FP32_PARAMS = ("A_log", "delta_raw", "p", "lambda_skip")

    def _apply(self, fn, recurse=True):
        # megatron's Float16Module calls model.bfloat16(): keep the SSM parameters fp32 (their
        # values, not a bf16 round trip) so Δ, ā, p̄ are computed from fp32 numbers; the
        # mixed-precision optimizer keeps fp32 parameters in its own group.
        keep = {name: getattr(self, name).data for name in self._FP32_PARAMS}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            param = getattr(self, name)
            if param.dtype in (torch.float16, torch.bfloat16) and old.dtype == torch.float32:
                param.data = old.to(param.device)
        return self

    def dynamics(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Discrete (ā, p̄) ``[H_local, P, S]`` in fp32 (fp64 for an fp64 model)."""
        return kla_core.dynamics(self.A_log, self.delta_raw, self.p)

    # ------------------------------------------------------------------ pieces

    def causal_conv(
        self,
        x: torch.Tensor,
        window: Optional[torch.Tensor] = None,
        position_in_doc: Optional[torch.Tensor] = None,
        activation: Optional[str] = "silu",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise conv, then SiLU (fused; ``ops/conv``).

        x ``[b, s, M]`` (may be a strided view of the in-projection output); ``window``
        ``[b, M, K-1]`` the previous K-1 inputs (zeros if None); ``position_in_doc`` ``[s]``
        position of each token inside its packed document (taps reaching before the document
        start read zero). Returns ``(y [b, s, M], new window)``.
        """
        backend = "torch" if self.runtime.scan_backend in ("naive", "recurrent") else self.runtime.scan_backend
        return causal_conv1d(x, self.conv_weight.to(x.dtype), self.conv_bias.to(x.dtype), window=window,
                             position_in_doc=position_in_doc, activation=activation, backend=backend)

    def sensors(self, z: torch.Tensor):
        """z ``[b, s, M_local]`` → v, Λv ``[b, s, H, P]``; k, q ``[b, s, H, S]``, in z's dtype.

        The block-diagonal projection is one batched matmul over heads reading z in place
        (``[H, b·s, P]`` strided view) and emitting the head-major ``[H, b, s, O]`` that the fused
        sensor kernel (``ops/kla/sensors.py``) reads; only the "mamba" preset (v = z, low-rank
        variance) goes through the PyTorch form."""
        b, s, _ = z.shape
        H, P, S = self.num_heads_local, self.head_dim, self.d_state
        z_heads = z.reshape(b * s, H, P).transpose(0, 1)
        sens = torch.bmm(z_heads, self.sensor_weight.to(z.dtype).transpose(1, 2)).view(H, b, s, -1)
        if self.mc.preset == "plain":
            return sensor_activations(sens, S, backend=self.runtime.scan_backend)
        log_var, k, q = (x.permute(1, 2, 0, 3) for x in torch.split(sens, [self.w_var, S, S], dim=-1))
        log_var = torch.einsum("bshr,hpr->bshp", log_var, self.var_expand.to(z.dtype))
        return kla_core.torch_sensor_activations(z.view(b, s, H, P), log_var, k, q)

    def scan(self, v, lambda_v, k, q, a, p, initial_state=None, cu_seqlens=None, output_final_state=False,
             output_variance=True):
        """The filter over the local heads (see ``kla_scan``), across the CP group if there is one."""
        with torch.autocast(device_type=v.device.type, enabled=False):
            return self.cp.scan(v, lambda_v, k, q, a, p, output_variance=output_variance,
                                initial_state=tuple(initial_state) if initial_state is not None else None,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                backend=self.runtime.scan_backend)

    def filter(self, z, gate, lambda_skip, cu_seqlens=None, inference_state=None, return_variance=False):
        """Everything between the conv and out_proj: sensors → scan (or one decode step) → output
        gate. z, gate ``[b, s, M_local]``. Returns ``(gated y [s, b, M_local], y_var [b, s, M_local]
        or None, the new filter state or None)``; reads but does not update ``inference_state``."""
        b, s, _ = z.shape
        v, lambda_v, k, q = self.sensors(z)
        a, p = self.dynamics()
        if inference_state is not None and s == 1 and cu_seqlens is None:
            y, y_var, new_state = kla_decode_step(
                v[:, 0], lambda_v[:, 0], k[:, 0], q[:, 0], a, p, inference_state.ssm, backend=self.runtime.scan_backend
            )
            y, y_var = y[:, None], y_var[:, None]
        else:
            initial = inference_state.ssm if inference_state is not None else None
            y, y_var, new_state = self.scan(
                v, lambda_v, k, q, a, p, initial_state=initial, cu_seqlens=cu_seqlens,
                output_final_state=inference_state is not None, output_variance=return_variance,
            )
        out = gated_output(y.reshape(b, s, self.d_inner_local), z, gate, lambda_skip, backend=self.runtime.scan_backend)
        if y_var is not None:
            y_var = y_var.reshape(b, s, self.d_inner_local)
        return out, y_var, new_state

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: torch.Tensor,
        inference_context=None,
        packed_seq_params=None,
        inference_state: Optional[KLALayerState] = None,
        return_variance: bool = False,
    ):
        """hidden_states ``[s, b, D]`` (``[s/TP, b, D]`` under SP).

        ``inference_state``: this layer's recurrent state, read and updated in place (O(1)
        decoding when s == 1). ``return_variance``: also return the output variance
        ``[s, b, D]`` (reduced like the output). Returns ``(out, bias)`` or
        ``((out, bias), out_var)``.
        """
        if inference_context is not None:
            raise ValueError("KLAMixer: megatron inference contexts are not supported; pass inference_state")
        zg, _ = self.in_proj(hidden_states)  # [s, b, 2 M_local] (sequence gathered under SP)
        zg = zg.transpose(0, 1)  # [b, s, 2 M_local]
        z, gate = zg.split(self.d_inner_local, dim=-1)
        b, s, _ = z.shape

        cu_seqlens, position_in_doc = self.cp.packing(packed_seq_params, b, s, z.device,
                                                      check=_eager_uncaptured(z.device))
        window = inference_state.conv if inference_state is not None else None
        z, new_window = self.cp.conv(self.causal_conv, z, self.mc.conv_kernel, window, position_in_doc)

        # λ_skip sees only this rank's channels: copy_to_... all-reduces its gradient over TP.
        lambda_skip = copy_to_tensor_model_parallel_region(self.lambda_skip, group=self.tp_group)
        if self.runtime.recompute_scan and torch.is_grad_enabled() and inference_state is None and not return_variance:
            # Selective recompute: keep only z and gate (alive anyway) for backward; the sensor
            # activations, the scan's inputs and checkpoints and its read-out run again there.
            y, y_var, new_state = torch.utils.checkpoint.checkpoint(self.filter, z, gate, lambda_skip, cu_seqlens,
                                                                    use_reentrant=False)
        else:
            y, y_var, new_state = self.filter(z, gate, lambda_skip, cu_seqlens, inference_state, return_variance)
        if inference_state is not None:
            inference_state.conv, inference_state.ssm = new_window.detach(), tuple(t.detach() for t in new_state)
        out = self.out_proj(y)
        if not return_variance:
            return out
        y_var = (y_var.to(z.dtype) * F.silu(gate).square()).transpose(0, 1)
        return out, self._output_variance(y_var)

    def _output_variance(self, y_var: torch.Tensor) -> torch.Tensor:
        """out_var = out_proj.weight² · y_var, reduced over TP like out_proj's output."""
        partial = F.linear(y_var, self.out_proj.weight.square().to(y_var.dtype))
        if self.config.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        return reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)

    # ------------------------------------------------------------------ inference

    def initial_inference_state(self, batch_size: int, device=None) -> KLALayerState:
        """Fresh recurrent state: zero conv window, λ = 1, η = 0 (fp32)."""
        device = device or self.A_log.device
        shape = (batch_size, self.num_heads_local, self.head_dim, self.d_state)
        return KLALayerState(
            conv=torch.zeros(batch_size, self.d_inner_local, self.mc.conv_kernel - 1, device=device,
                             dtype=self.conv_weight.dtype),
            ssm=kla_core.default_state(shape, dtype=kla_core.state_dtype(self.A_log), device=device),
        )

    # ------------------------------------------------------------------ checkpoint

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Every per-head tensor is TP-sharded on dim 0 (heads are TP-contiguous); the fused
        in_proj weight is split into ``.z`` and ``.gate`` shards so that a checkpoint loads
        under any TP size (its rank-local layout [z_r | gate_r] depends on TP)."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        axis_map = {name: 0 for name, t in own.items() if getattr(t, "tensor_model_parallel", False)}
        sharded = make_sharded_tensors_for_checkpoint(
            own, prefix, axis_map, sharded_offsets, tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"]
        )
        for name, module in self.named_children():
            sharded.update(
                sharded_state_dict_default(module, f"{prefix}{name}.", sharded_offsets, metadata, tp_group=self.tp_group)
            )
        key = f"{prefix}in_proj.weight"
        sharded[key] = split_sharded_tensor(sharded[key], [self.d_inner_local] * 2, ["z", "gate"], split_dim=0)
        return sharded


def _eager_uncaptured(device) -> bool:
    """Whether host syncs are allowed: not while torch.compile traces (a graph break; checked
    first, so the capture query is never traced) nor while a CUDA graph is captured (an error)."""
    if torch.compiler.is_compiling():
        return False
    return not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())
