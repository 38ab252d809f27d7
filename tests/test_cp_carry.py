"""Chunk summaries for context parallelism (ops/kla/carry.py) against autograd on the
float64 reference loop: the transform reproduces the final state, and (Q, o) reproduce the
start adjoint and the end-to-start Jacobian in (mu, sigma) coordinates."""
import pytest
import torch

from kla_megatron.ops.kla import kla_scan
from kla_megatron.ops.kla import transform as tr
from kla_megatron.ops.kla.carry import (
    adjoint_to_info,
    apply_adjoint_map,
    chunk_transforms,
    compose_adjoint_maps,
    end_adjoint_maps,
    info_to_adjoint,
)

F64 = torch.float64
H, P, S = 2, 3, 4

# (a range, p range) per regime
REGIMES = {
    "forgetful": (0.5, 1.0, 0.0, 0.05),
    "long-memory": (1 - 1e-6, 1.0, 0.0, 1e-12),
    "tiny-a": (1e-3, 0.9, 0.0, 1e-2),
}


def make_inputs(B, L, a_lo, a_hi, p_lo, p_hi, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(B, L, H, P, generator=g, dtype=F64)
    lv = torch.rand(B, L, H, P, generator=g, dtype=F64) * 2 + 0.05
    k = torch.randn(B, L, H, S, generator=g, dtype=F64)
    q = torch.randn(B, L, H, S, generator=g, dtype=F64)
    a = a_lo + (a_hi - a_lo) * torch.rand(H, P, S, generator=g, dtype=F64)
    p = p_lo + (p_hi - p_lo) * torch.rand(H, P, S, generator=g, dtype=F64)
    return v, lv, k, q, a, p


def random_state(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, H, P, S, generator=g, dtype=F64) + 0.5, torch.randn(n, H, P, S, generator=g, dtype=F64)


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("L", [1, 37, 130])
def test_transform_gives_final_state(regime, L):
    v, lv, k, q, a, p = make_inputs(2, L, *REGIMES[regime])
    lam0, eta0 = random_state(2)
    T = chunk_transforms(v * lv, lv, k, a, p, block_size=16)
    assert T.shape == (7, 2, H, P, S)
    _, _, (lam, eta) = kla_scan(v, lv, k, q, a, p, initial_state=(lam0, eta0), output_final_state=True, backend="naive")
    lam_t, eta_t = tr.apply(T, lam0, eta0)
    torch.testing.assert_close(lam_t, lam, rtol=1e-11, atol=0)
    torch.testing.assert_close(eta_t, eta, rtol=1e-11, atol=1e-11 * eta.abs().max().item())


def test_transform_per_document():
    v, lv, k, q, a, p = make_inputs(1, 40, 0.8, 1.0, 0.0, 0.02)
    cu = torch.tensor([0, 7, 8, 40])
    lam0, eta0 = random_state(3)
    T = chunk_transforms(v * lv, lv, k, a, p, cu_seqlens=cu)
    _, _, (lam, eta) = kla_scan(
        v, lv, k, q, a, p, initial_state=(lam0, eta0), output_final_state=True, cu_seqlens=cu, backend="naive"
    )
    lam_t, eta_t = tr.apply(T, lam0, eta0)
    torch.testing.assert_close(lam_t, lam, rtol=1e-11, atol=0)
    torch.testing.assert_close(eta_t, eta, rtol=1e-11, atol=1e-12)


def _reference_maps(v, lv, k, q, a, p, gy, gv, state, grad_final, cu=None):
    """o and Q by autograd through the naive loop, parametrised by (mu0, sigma0)."""
    lam0, eta0 = state
    mu0 = (eta0 / lam0).requires_grad_()
    sg0 = (1 / lam0).requires_grad_()
    y, yv, (lam, eta) = kla_scan(
        v, lv, k, q, a, p, initial_state=(1 / sg0, mu0 / sg0), output_final_state=True, cu_seqlens=cu, backend="naive"
    )
    loss = (y * gy).sum() + (yv * gv).sum() + (lam * grad_final[0]).sum() + (eta * grad_final[1]).sum()
    o = torch.stack(torch.autograd.grad(loss, [mu0, sg0], retain_graph=True))
    # Jacobian rows of (mu_end, sigma_end): the maps are per lane, so a summed VJP per output is exact.
    d_mu = torch.autograd.grad((eta / lam).sum(), [mu0, sg0], retain_graph=True)
    d_sg = torch.autograd.grad((1 / lam).sum(), [mu0, sg0], retain_graph=True, allow_unused=True)
    assert d_sg[0] is None  # sigma never depends on mu
    return torch.stack([d_mu[0], d_mu[1], d_sg[1]]), o


@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("L", [1, 37, 130])
def test_end_adjoint_maps_match_autograd(regime, L):
    v, lv, k, q, a, p = make_inputs(2, L, *REGIMES[regime])
    state = random_state(2)
    g = torch.Generator().manual_seed(5)
    gy, gv = (torch.randn(2, L, H, P, generator=g, dtype=F64) for _ in range(2))
    grad_final = tuple(torch.randn(2, H, P, S, generator=g, dtype=F64) for _ in range(2))
    Q, o = end_adjoint_maps(v, lv, k, q, a, p, gy, gv, state, grad_final_state=grad_final, block_size=16)
    Q_ref, o_ref = _reference_maps(v, lv, k, q, a, p, gy, gv, state, grad_final)
    torch.testing.assert_close(Q, Q_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-10 * o_ref.abs().max().item())
    if regime == "long-memory":
        assert Q[0].abs().min() > 1e-4  # the end adjoint really reaches the start (0.5**130 elsewhere)


def test_end_adjoint_maps_per_document_and_composition():
    v, lv, k, q, a, p = make_inputs(1, 50, 0.9, 1.0, 0.0, 0.01)
    g = torch.Generator().manual_seed(3)
    gy, gv = (torch.randn(1, 50, H, P, generator=g, dtype=F64) for _ in range(2))
    cu = torch.tensor([0, 20, 50])
    state = random_state(2)
    grad_final = tuple(torch.randn(2, H, P, S, generator=g, dtype=F64) for _ in range(2))
    Q, o = end_adjoint_maps(v, lv, k, q, a, p, gy, gv, state, grad_final_state=grad_final, cu_seqlens=cu)
    Q_ref, o_ref = _reference_maps(v, lv, k, q, a, p, gy, gv, state, grad_final, cu)
    torch.testing.assert_close(Q, Q_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(o, o_ref, rtol=1e-10, atol=1e-12)

    # Splitting one sequence at t=20 and composing the two maps gives the whole map.
    sl1, sl2 = slice(0, 20), slice(20, 50)
    _, _, (lam_mid, eta_mid) = kla_scan(
        *(x[:, sl1] for x in (v, lv, k, q)), a, p, initial_state=tuple(s[:1] for s in state),
        output_final_state=True, backend="naive",
    )
    args = lambda sl: [x[:, sl] for x in (v, lv, k, q)] + [a, p, gy[:, sl], gv[:, sl]]
    first = end_adjoint_maps(*args(sl1), tuple(s[:1] for s in state))
    second = end_adjoint_maps(*args(sl2), (lam_mid, eta_mid))
    whole = end_adjoint_maps(*args(slice(0, 50)), tuple(s[:1] for s in state))
    joined = compose_adjoint_maps(first, second)
    torch.testing.assert_close(joined[0], whole[0], rtol=1e-11, atol=1e-14)
    torch.testing.assert_close(joined[1], whole[1], rtol=1e-11, atol=1e-12)
    c_end = torch.randn(2, 1, H, P, S, generator=g, dtype=F64)
    torch.testing.assert_close(
        apply_adjoint_map(*joined, c_end), apply_adjoint_map(*first, apply_adjoint_map(*second, c_end))
    )


def test_adjoint_coordinate_round_trip():
    lam, eta = random_state(3)
    c = torch.randn(2, 3, H, P, S, dtype=F64)
    torch.testing.assert_close(info_to_adjoint(*adjoint_to_info(c, lam, eta), lam, eta), c)


def test_bad_cu_seqlens_raises():
    v, lv, k, q, a, p = make_inputs(1, 10, 0.9, 1.0, 0.0, 0.01)
    with pytest.raises(ValueError, match="cu_seqlens"):
        chunk_transforms(v * lv, lv, k, a, p, cu_seqlens=torch.tensor([0, 5, 9]))
