"""The reference loop against an independent scalar loop, and autograd through it."""
import pytest
import torch

from kla_megatron.ops.kla import kla_scan

from .kla_inputs import make_inputs


def scalar_loop(v, lambda_v, k, q, a, p, lam0, eta0):
    """Covariance-form filter written lane by lane in Python floats (docs/kla.md#sequential-forms)."""
    B, L, H, P = v.shape
    S = k.shape[-1]
    y = torch.zeros(B, L, H, P, dtype=torch.float64)
    y_var = torch.zeros_like(y)
    lam_out, eta_out = torch.zeros_like(lam0), torch.zeros_like(eta0)
    for b in range(B):
        for h in range(H):
            for m in range(P):
                for s in range(S):
                    aa, pp = float(a[h, m, s]), float(p[h, m, s])
                    sigma = 1.0 / float(lam0[b, h, m, s])
                    mu = float(eta0[b, h, m, s]) * sigma
                    for t in range(L):
                        kk, lv = float(k[b, t, h, s]), float(lambda_v[b, t, h, m])
                        phi, r = lv * kk * kk, float(v[b, t, h, m]) * lv * kk
                        prior = aa * aa * sigma + pp
                        iota = 1.0 / (1.0 + phi * prior)
                        sigma, mu = prior * iota, (aa * mu + r * prior) * iota
                        qq = float(q[b, t, h, s])
                        y[b, t, h, m] += qq * mu
                        y_var[b, t, h, m] += qq * qq * sigma
                    lam_out[b, h, m, s] = 1.0 / sigma
                    eta_out[b, h, m, s] = mu / sigma
    return y, y_var, lam_out, eta_out


@pytest.mark.parametrize("regime", ["default", "a_tiny", "lv_wide"])
def test_naive_matches_scalar_loop(regime):
    x = make_inputs(2, 9, 2, 3, 2, regime=regime, seed=3)
    y, y_var, (lam, eta) = kla_scan(**x, output_final_state=True, backend="naive")
    ry, ryv, rlam, reta = scalar_loop(x["v"], x["lambda_v"], x["k"], x["q"], x["a"], x["p"], *x["initial_state"])
    for got, ref in ((y, ry), (y_var, ryv), (lam, rlam), (eta, reta)):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_naive_default_initial_state_is_unit_precision():
    x = make_inputs(1, 4, 1, 2, 2, seed=4, with_state=False)
    state = (torch.ones(1, 1, 2, 2, dtype=torch.float64), torch.zeros(1, 1, 2, 2, dtype=torch.float64))
    r1 = kla_scan(**x, output_final_state=True, backend="naive")
    x["initial_state"] = state
    r2 = kla_scan(**x, output_final_state=True, backend="naive")
    torch.testing.assert_close(r1[0], r2[0], rtol=0, atol=0)
    torch.testing.assert_close(r1[2][0], r2[2][0], rtol=0, atol=0)


def test_naive_gradcheck_all_inputs():
    x = make_inputs(2, 5, 2, 2, 3, seed=5)
    names = ("v", "lambda_v", "k", "q", "a", "p")

    def fn(v, lambda_v, k, q, a, p, lam0, eta0):
        y, y_var, (lam, eta) = kla_scan(
            v, lambda_v, k, q, a, p, initial_state=(lam0, eta0), output_final_state=True, backend="naive"
        )
        return y, y_var, lam, eta

    args = [x[n].clone().requires_grad_(True) for n in names]
    args += [s.clone().requires_grad_(True) for s in x["initial_state"]]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-5)
