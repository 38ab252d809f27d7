"""The blocked sequential scan (``backend="recurrent"``, what ``auto`` runs on the CPU) against
the float64 reference: outputs, final state and every gradient, across lengths, regimes,
block boundaries, packed documents, without y_var, bf16 inputs and under no_grad."""
import functools

import pytest
import torch

from kla_megatron.ops.kla import kla_decode_step, kla_scan
from kla_megatron.ops.kla.recurrent import recurrent_kla_scan
from kla_megatron.ops.kla.scan import _resolve_backend

from .kla_inputs import REGIMES, assert_close_all, make_inputs, outputs_and_grads, upcast

naive = functools.partial(kla_scan, backend="naive")
FP32_TOL = 1e-5


def _compare(shape, regime, seed, dtype, tol, scan=None, **kw):
    scan = scan or functools.partial(kla_scan, backend="recurrent")
    x = make_inputs(*shape, regime=regime, seed=seed, dtype=dtype, n_seq=kw.pop("n_seq", None))
    ref_out, ref_grad = outputs_and_grads(naive, upcast(x), **kw)
    out, grad = outputs_and_grads(scan, x, **kw)
    assert_close_all(out, ref_out, tol, f"{dtype} outputs {shape} {regime}")
    assert_close_all(grad, ref_grad, tol, f"{dtype} grads {shape} {regime}")


def test_auto_resolves_to_recurrent_on_cpu():
    assert _resolve_backend("auto", torch.device("cpu")) == "recurrent"
    assert _resolve_backend("recurrent", torch.device("cpu")) == "recurrent"


def test_auto_on_cpu_is_recurrent_bitwise():
    x = make_inputs(2, 70, 2, 3, 4, seed=40, dtype=torch.float32)
    got = kla_scan(**x, output_final_state=True, backend="auto")
    ref = kla_scan(**x, output_final_state=True, backend="recurrent")
    for g, r in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
        assert torch.equal(g, r)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, FP32_TOL)], ids=["fp64", "fp32"])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 2, 3, 4), (3, 2, 2, 3, 4), (2, 63, 3, 2, 4), (1, 500, 2, 3, 4), (2, 1000, 1, 3, 2)],
    ids=lambda s: "B{}L{}H{}P{}S{}".format(*s),
)
def test_recurrent_matches_naive_lengths(shape, dtype, tol):
    _compare(shape, "default", 41, dtype, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["fp64", "fp32"])
@pytest.mark.parametrize("regime", [r for r in REGIMES if r != "default"])
def test_recurrent_matches_naive_regimes(regime, dtype, tol):
    _compare((2, 300, 2, 3, 4), regime, 42, dtype, tol)


@pytest.mark.parametrize("block", [1, 7, 64, 1024])
def test_block_size_does_not_change_results(block):
    scan = functools.partial(recurrent_kla_scan, block=block)

    def wrapped(**kw):
        kw.pop("backend", None)
        return scan(**kw)

    _compare((2, 130, 2, 3, 4), "lv_wide", 43, torch.float64, 1e-11, scan=wrapped)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, FP32_TOL)], ids=["fp64", "fp32"])
def test_packed_documents(dtype, tol):
    cu = torch.tensor([0, 5, 6, 150, 300])
    _compare((1, 300, 2, 3, 4), "default", 44, dtype, tol, cu_seqlens=cu, n_seq=4)


@pytest.mark.parametrize("with_state", [True, False])
def test_without_variance_and_initial_state(with_state):
    x = make_inputs(2, 140, 2, 3, 4, seed=45, with_state=with_state)
    ref_out, ref_grad = outputs_and_grads(naive, x, output_variance=False)
    out, grad = outputs_and_grads(functools.partial(kla_scan, backend="auto"), x, output_variance=False)
    assert "y_var" not in out
    assert_close_all(out, ref_out, 1e-11, "outputs")
    assert_close_all(grad, ref_grad, 1e-11, "grads")


def test_no_grad_equals_grad_path():
    x = make_inputs(2, 200, 2, 3, 4, seed=46, dtype=torch.float32)
    with torch.no_grad():
        a = kla_scan(**x, output_final_state=True)
    leaves = {k: (v.clone().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in x.items()}
    b = kla_scan(**leaves, output_final_state=True)
    for g, r in zip((a[0], a[1], *a[2]), (b[0], b[1], *b[2])):
        assert torch.equal(g, r.detach())


def test_bf16_inputs_give_bf16_outputs_fp32_state():
    x = make_inputs(2, 50, 2, 3, 4, seed=47, dtype=torch.bfloat16)
    y, y_var, (lam, eta) = kla_scan(**x, output_final_state=True)
    assert y.dtype == y_var.dtype == torch.bfloat16 and lam.dtype == eta.dtype == torch.float32
    ref = make_inputs(2, 50, 2, 3, 4, seed=47)
    ref.update({k: x[k].double() for k in ("v", "lambda_v", "k", "q")})
    ry, _, (rlam, _) = naive(**ref, output_final_state=True)
    assert (y.double() - ry).norm() / ry.norm() < 1e-2
    assert (lam.double() - rlam).norm() / rlam.norm() < 1e-5


def test_decode_auto_matches_scan():
    x = make_inputs(3, 9, 2, 3, 4, seed=48)
    y, y_var, final = kla_scan(**x, output_final_state=True, backend="auto")
    state = x["initial_state"]
    for t in range(9):
        yt, yvt, state = kla_decode_step(*(x[k][:, t] for k in ("v", "lambda_v", "k", "q")), x["a"], x["p"], state)
        torch.testing.assert_close(yt, y[:, t], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(yvt, y_var[:, t], rtol=1e-10, atol=1e-12)
    for got, ref in zip(state, final):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
