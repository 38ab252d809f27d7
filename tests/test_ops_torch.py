"""The parallel PyTorch scan against the float64 reference: outputs, final state, every gradient."""
import functools

import pytest
import torch

from kla_megatron.ops.kla import kla_scan

from .kla_inputs import REGIMES, assert_close_all, make_inputs, outputs_and_grads, upcast

naive = functools.partial(kla_scan, backend="naive")
torch_scan = functools.partial(kla_scan, backend="torch")
FP32_TOL = 1e-5


def _compare(shape, regime, seed, dtype, tol):
    x = make_inputs(*shape, regime=regime, seed=seed, dtype=dtype)
    ref_out, ref_grad = outputs_and_grads(naive, upcast(x))
    out, grad = outputs_and_grads(torch_scan, x)
    assert_close_all(out, ref_out, tol, f"{dtype} outputs {shape} {regime}")
    assert_close_all(grad, ref_grad, tol, f"{dtype} grads {shape} {regime}")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, FP32_TOL)], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 2, 3, 4), (3, 2, 2, 3, 4), (2, 63, 3, 2, 4), (1, 500, 2, 3, 4), (2, 1000, 1, 3, 2), (1, 4096, 2, 2, 2)],
    ids=lambda s: "B{}L{}H{}P{}S{}".format(*s),
)
def test_torch_matches_naive_lengths(shape, dtype, tol):
    _compare(shape, "default", 11, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, FP32_TOL)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("regime", [r for r in REGIMES if r != "default"])
def test_torch_matches_naive_regimes(regime, dtype, tol):
    _compare((2, 300, 2, 3, 4), regime, 12, dtype, tol)


def test_torch_long_sequence_no_forgetting_fp32():
    """a = 1, p = 0: λ grows without bound; blocked composition keeps fp32 accurate."""
    _compare((1, 4096, 1, 2, 2), "a_one_p_zero", 13, torch.float32, FP32_TOL)


def test_bf16_inputs_give_bf16_outputs_fp32_state():
    x = make_inputs(2, 50, 2, 3, 4, seed=14, dtype=torch.bfloat16)
    y, y_var, (lam, eta) = torch_scan(**x, output_final_state=True)
    assert y.dtype == y_var.dtype == torch.bfloat16 and lam.dtype == eta.dtype == torch.float32
    ref = make_inputs(2, 50, 2, 3, 4, seed=14)
    ref.update({k: x[k].double() for k in ("v", "lambda_v", "k", "q")})
    ry, _, (rlam, _) = naive(**ref, output_final_state=True)
    assert (y.double() - ry).norm() / ry.norm() < 1e-2
    assert (lam.double() - rlam).norm() / rlam.norm() < 1e-5
