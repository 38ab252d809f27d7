"""The fused glue around the scan (ops/kla/sensors.py, ops/kla/gate.py) against float64.

The references here are written from the layer's equations (docs/kla.md#layer) with plain
PyTorch autograd in float64, not from the module's own helpers. CPU: Triton through the
interpreter at small sizes; GPU (`gpu` mark): the model's sizes in bf16.
"""
import pytest
import torch

from kla_megatron.ops.kla.gate import gated_output
from kla_megatron.ops.kla.sensors import sensor_activations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _ref_sensors(sens, S):
    """float64: [H, B, L, 2P+2S] → v, Λv, k̂, q̂ [B, L, H, ·]."""
    P = (sens.shape[-1] - 2 * S) // 2
    x = sens.permute(1, 2, 0, 3)
    v, log_var, k, q = x[..., :P], x[..., P:2 * P], x[..., 2 * P:2 * P + S], x[..., 2 * P + S:]
    lam = 1.0 / (torch.log1p(torch.exp(log_var)) + 1e-4)
    unit = lambda t: t / torch.linalg.vector_norm(t, dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return v, lam, unit(k), unit(q)


def _ref_gate(y, z, gate, lam):
    return ((y + lam * z) * gate * torch.sigmoid(gate)).transpose(0, 1)


def _grads(fn, inputs, seed):
    """Outputs and the gradients of a random projection of them (cotangents drawn per output)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * c.to(o.device)).sum() for o, c in zip(outs, cots))
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach().double().cpu() for o in outs], [g.double().cpu() for g in grads]


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _sens(H, B, L, P, S, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    sens = torch.randn(H, B, L, 2 * P + 2 * S, generator=gen, dtype=torch.float64) * scale
    sens[..., P:2 * P] *= 4  # log σ²_v across softplus' linear and exponential tails
    sens[0, 0, 0, 2 * P:2 * P + S] = 0.0  # a zero key: the norm floor
    return sens


@pytest.mark.parametrize("shape", [(1, 1, 1, 3, 2), (3, 2, 7, 5, 3), (2, 1, 33, 64, 16)])
def test_sensors_match_float64(shape):
    H, B, L, P, S = shape
    sens = _sens(H, B, L, P, S, seed=sum(shape))
    ref_out, ref_grad = _grads(lambda s: _ref_sensors(s, S), [sens], seed=1)
    out, grad = _grads(lambda s: sensor_activations(s, S, backend="triton"), [sens.float().to(DEVICE)], seed=1)
    for name, a, b in zip(("v", "lambda_v", "k", "q"), out, ref_out):
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))
    assert _rel(grad[0], ref_grad[0]) < 1e-6, _rel(grad[0], ref_grad[0])
    # the PyTorch form (CPU default, float64) is the same function
    out64, grad64 = _grads(lambda s: sensor_activations(s, S), [sens], seed=1)
    assert all(_rel(a, b) < 1e-12 for a, b in zip(out64, ref_out))
    assert _rel(grad64[0], ref_grad[0]) < 1e-12


def test_sensors_extreme_log_var_stay_finite_and_exact():
    """log σ²_v at ±60: Λv saturates at 1/OBS_VAR_MIN and near 1/x, gradients stay finite."""
    H, B, L, P, S = 1, 1, 4, 4, 2
    sens = _sens(H, B, L, P, S, seed=5)
    sens[..., P:2 * P] = torch.tensor([-60.0, -20.0, 20.0, 60.0], dtype=torch.float64)
    ref_out, ref_grad = _grads(lambda s: _ref_sensors(s, S), [sens], seed=2)
    out, grad = _grads(lambda s: sensor_activations(s, S, backend="triton"), [sens.float().to(DEVICE)], seed=2)
    assert all(torch.isfinite(x).all() for x in out + grad)
    assert _rel(out[1], ref_out[1]) < 1e-6 and _rel(grad[0], ref_grad[0]) < 1e-6


def test_sensors_bad_width_is_named():
    with pytest.raises(ValueError, match="2P \\+ 2S"):
        sensor_activations(torch.zeros(1, 1, 2, 7), 2)


def _gate_inputs(B, L, M, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    y, z = (torch.randn(B, L, M, generator=gen, dtype=dtype) for _ in range(2))
    zg = torch.randn(L, B, 2 * M, generator=gen, dtype=dtype) * 4  # gate is a strided view of this
    return y, z, zg, torch.tensor(-0.8, dtype=dtype)


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 19, 300), (3, 5, 64)])
def test_gate_matches_float64(shape):
    B, L, M = shape
    y, z, zg, lam = _gate_inputs(B, L, M, seed=M)
    gate_of = lambda zg_: zg_.transpose(0, 1)[..., M:]  # noqa: E731
    ref_out, ref_grad = _grads(lambda y_, z_, zg_, l_: _ref_gate(y_, z_, gate_of(zg_), l_), [y, z, zg, lam], seed=3)
    dev = [t.float().to(DEVICE) for t in (y, z, zg, lam)]
    out, grad = _grads(lambda y_, z_, zg_, l_: gated_output(y_, z_, gate_of(zg_), l_, backend="triton"), dev, seed=3)
    assert out[0].shape == (L, B, M)
    assert _rel(out[0], ref_out[0]) < 1e-6
    for name, a, b in zip(("y", "z", "zg", "lambda_skip"), grad, ref_grad):
        assert _rel(a, b) < 1e-6, (name, _rel(a, b))
    assert grad[2][..., :M].abs().max() == 0  # only the gate half of zg is read


def test_gate_bad_shapes_are_named():
    y = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="one \\[B, L, M\\] shape"):
        gated_output(y, y, torch.zeros(1, 2, 4), torch.tensor(0.0))
    with pytest.raises(ValueError, match="scalar"):
        gated_output(y, y, y, torch.zeros(2))


@pytest.mark.gpu
def test_gpu_glue_bf16_at_model_size():
    """B2·L4096, 64 heads of P = 64, S = 16, bf16 in and out: within bf16 rounding of float64."""
    H, B, L, P, S = 64, 2, 4096, 64, 16
    sens = _sens(H, B, L, P, S, seed=11, scale=1.0)
    ref_out, ref_grad = _grads(lambda s: _ref_sensors(s, S), [sens.cuda()], seed=4)
    out, grad = _grads(lambda s: sensor_activations(s, S), [sens.to("cuda", torch.bfloat16)], seed=4)
    assert all(_rel(a, b) < 1e-2 for a, b in zip(out, ref_out))
    assert _rel(grad[0], ref_grad[0]) < 1e-2
    M = H * P
    y, z, zg, lam = _gate_inputs(B, L, M, seed=12)
    gate_of = lambda zg_: zg_.transpose(0, 1)[..., M:]  # noqa: E731
    ref_out, ref_grad = _grads(lambda y_, z_, zg_, l_: _ref_gate(y_, z_, gate_of(zg_), l_),
                               [t.cuda() for t in (y, z, zg, lam)], seed=5)
    dev = [t.to("cuda", torch.bfloat16) for t in (y, z, zg)] + [lam.float().cuda()]
    out, grad = _grads(lambda y_, z_, zg_, l_: gated_output(y_, z_, gate_of(zg_), l_), dev, seed=5)
    assert _rel(out[0], ref_out[0]) < 1e-2
    assert all(_rel(a, b) < 1e-2 for a, b in zip(grad, ref_grad))


def test_glue_ops_pass_opcheck_with_a_strided_gate():
    """Fake (meta) implementations give the real ops' shapes *and strides*: with ``gate`` a
    strided view, as in the layer, a fake that copied its strides broke CUDA-graph compiles."""
    B, L, M = 2, 5, 8
    y, z, zg, lam = (t.float().to(DEVICE) for t in _gate_inputs(B, L, M, seed=9))
    gate = zg.transpose(0, 1)[..., M:]
    assert not gate.is_contiguous()
    lam = lam.reshape(())
    torch.library.opcheck(torch.ops.kla.gate_fwd, (y, z, gate, lam))
    d_out = torch.randn(L, B, M, device=DEVICE)
    torch.library.opcheck(torch.ops.kla.gate_bwd, (y, z, gate, lam, d_out))
    sens = _sens(2, B, L, 3, 2, seed=8).float().to(DEVICE)
    torch.library.opcheck(torch.ops.kla.sensors_fwd, (sens, 2))
