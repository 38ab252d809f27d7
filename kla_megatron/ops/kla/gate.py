"""The output gate of a KLA layer (docs/kla.md#layer), fused into one kernel each way:

    out = (y + λ_skip·z) · SiLU(gate)

``y`` (the scan's read-out), ``z`` (the post-conv stream) and ``gate`` are ``[B, L, M]``
(``gate`` may be a strided view of the in-projection output), ``lambda_skip`` a 0-d fp32
tensor read on the device (no host sync). ``out`` comes back **sequence-first** ``[L, B, M]``,
the layout megatron's out-projection takes, so no transpose copy follows. The backward
recomputes SiLU from the saved inputs and writes dy, dz, dgate in one pass; dλ is summed
from per-program partials (deterministic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .sensors import use_triton


def torch_gated_output(y: Tensor, z: Tensor, gate: Tensor, lambda_skip: Tensor) -> Tensor:
    """Reference form (any dtype; computed in ``z``'s dtype), ``[L, B, M]``."""
    out = (y.to(z.dtype) + lambda_skip.to(z.dtype) * z) * F.silu(gate)
    return out.transpose(0, 1).contiguous()


def gated_output(y: Tensor, z: Tensor, gate: Tensor, lambda_skip: Tensor, backend: str = "auto") -> Tensor:
    """``(y + λ_skip·z)·SiLU(gate)`` as ``[L, B, M]`` (module docstring); ``backend`` as in
    :func:`.sensors.use_triton`."""
    if not (y.shape == z.shape == gate.shape) or z.dim() != 3:
        raise ValueError(f"gated_output: y, z, gate must share one [B, L, M] shape, got "
                         f"{tuple(y.shape)}, {tuple(z.shape)}, {tuple(gate.shape)}")
    if lambda_skip.numel() != 1:
        raise ValueError(f"gated_output: lambda_skip must be a scalar, got shape {tuple(lambda_skip.shape)}")
    if not use_triton(backend, z) or lambda_skip.device != z.device:
        return torch_gated_output(y, z, gate, lambda_skip)
    y, z, gate = (x if x.stride(-1) == 1 else x.contiguous() for x in (y, z, gate))
    return torch.ops.kla.gate_fwd(y, z, gate, lambda_skip.reshape(()).float())


try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

if triton is not None:
    BR, BM = 16, 256

    @triton.jit
    def _tile(i_r, i_m, n_rows, L, M, BR: tl.constexpr, BM: tl.constexpr):
        """Rows (b, l) and channels of one program; b = row // L, l = row % L."""
        o_r = i_r * BR + tl.arange(0, BR)
        o_m = i_m * BM + tl.arange(0, BM)
        mask = (o_r < n_rows)[:, None] & (o_m < M)[None, :]
        return (o_r // L).to(tl.int64), (o_r % L).to(tl.int64), o_m, mask

    @triton.jit
    def _at(ptr, b, l, m, s_b, s_l):
        return ptr + b[:, None] * s_b + l[:, None] * s_l + m[None, :]

    @triton.jit
    def _gate_fwd_kernel(y, z, gate, lam, out, n_rows, L, M, B,
                         s_yb, s_yl, s_zb, s_zl, s_gb, s_gl, BR: tl.constexpr, BM: tl.constexpr):
        b, l, m, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, L, M, BR, BM)
        b_y = tl.load(_at(y, b, l, m, s_yb, s_yl), mask=mask, other=0.0).to(tl.float32)
        b_z = tl.load(_at(z, b, l, m, s_zb, s_zl), mask=mask, other=0.0).to(tl.float32)
        b_g = tl.load(_at(gate, b, l, m, s_gb, s_gl), mask=mask, other=0.0).to(tl.float32)
        b_lam = tl.load(lam)
        silu = b_g / (1.0 + tl.exp(-b_g))
        tl.store(_at(out, b, l, m, M, B * M), ((b_y + b_lam * b_z) * silu).to(out.dtype.element_ty), mask=mask)

    @triton.jit
    def _gate_bwd_kernel(y, z, gate, lam, d_out, d_y, d_z, d_gate, d_lam_part, n_rows, L, M, B,
                         s_yb, s_yl, s_zb, s_zl, s_gb, s_gl, BR: tl.constexpr, BM: tl.constexpr):
        i_r, i_m = tl.program_id(0), tl.program_id(1)
        b, l, m, mask = _tile(i_r, i_m, n_rows, L, M, BR, BM)
        b_y = tl.load(_at(y, b, l, m, s_yb, s_yl), mask=mask, other=0.0).to(tl.float32)
        b_z = tl.load(_at(z, b, l, m, s_zb, s_zl), mask=mask, other=0.0).to(tl.float32)
        b_g = tl.load(_at(gate, b, l, m, s_gb, s_gl), mask=mask, other=0.0).to(tl.float32)
        b_do = tl.load(_at(d_out, b, l, m, M, B * M), mask=mask, other=0.0).to(tl.float32)
        b_lam = tl.load(lam)
        sig = 1.0 / (1.0 + tl.exp(-b_g))
        b_dy = b_do * b_g * sig  # d out / d y = SiLU(g)
        # SiLU'(g) = σ(g)·(1 + g·(1 − σ(g)))
        b_dg = b_do * (b_y + b_lam * b_z) * sig * (1.0 + b_g * (1.0 - sig))
        o = b[:, None] * L * M + l[:, None] * M + m[None, :]  # gradients come back contiguous [B, L, M]
        tl.store(d_y + o, b_dy.to(d_y.dtype.element_ty), mask=mask)
        tl.store(d_z + o, (b_lam * b_dy).to(d_z.dtype.element_ty), mask=mask)
        tl.store(d_gate + o, b_dg.to(d_gate.dtype.element_ty), mask=mask)
        tl.store(d_lam_part + i_r * tl.num_programs(1) + i_m, tl.sum(tl.sum(b_dy * b_z, axis=1), axis=0))

    def _grid(B, L, M):
        return (triton.cdiv(B * L, BR), triton.cdiv(M, BM))

    def _strides(y, z, gate):
        return (*y.stride()[:2], *z.stride()[:2], *gate.stride()[:2])

    @torch.library.custom_op("kla::gate_fwd", mutates_args=())
    def _gate_fwd(y: Tensor, z: Tensor, gate: Tensor, lambda_skip: Tensor) -> Tensor:
        B, L, M = z.shape
        out = z.new_empty(L, B, M)
        _gate_fwd_kernel[_grid(B, L, M)](y, z, gate, lambda_skip, out, B * L, L, M, B, *_strides(y, z, gate),
                                         BR=BR, BM=BM)
        return out

    @_gate_fwd.register_fake
    def _(y, z, gate, lambda_skip):
        B, L, M = z.shape
        return z.new_empty(L, B, M)

    def _contiguous_grads(y, z, gate):
        """dy, dz, dgate buffers, contiguous whatever the inputs' strides (``gate`` is usually a
        strided view); the fake must allocate the same, or compiled graphs assert on strides."""
        return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (y, z, gate))

    @torch.library.custom_op("kla::gate_bwd", mutates_args=())
    def _gate_bwd(y: Tensor, z: Tensor, gate: Tensor, lambda_skip: Tensor,
                  d_out: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        B, L, M = z.shape
        grid = _grid(B, L, M)
        d_y, d_z, d_gate = _contiguous_grads(y, z, gate)
        part = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=z.device)
        _gate_bwd_kernel[grid](y, z, gate, lambda_skip, d_out, d_y, d_z, d_gate, part, B * L, L, M, B,
                               *_strides(y, z, gate), BR=BR, BM=BM)
        return d_y, d_z, d_gate, part.sum()

    @_gate_bwd.register_fake
    def _(y, z, gate, lambda_skip, d_out):
        return (*_contiguous_grads(y, z, gate), lambda_skip.new_empty(()))

    def _setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _backward(ctx, d_out):
        y, z, gate, lambda_skip = ctx.saved_tensors
        d_y, d_z, d_gate, d_lam = torch.ops.kla.gate_bwd(y, z, gate, lambda_skip, d_out.contiguous())
        return d_y, d_z, d_gate, d_lam

    _gate_fwd.register_autograd(_backward, setup_context=_setup)
