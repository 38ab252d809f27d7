"""kla_scan contracts: packed documents, split sequences, decode, discretisation, bad inputs."""
import pytest
import torch

from kla_megatron.ops.kla import discretize, kla_decode_step, kla_scan

from .kla_inputs import make_inputs

BACKENDS = ["naive", "recurrent", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_equals_separate_documents(backend):
    lengths = [5, 1, 17, 40]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    x = make_inputs(1, sum(lengths), 2, 3, 4, seed=21, n_seq=len(lengths))
    y, y_var, (lam, eta) = kla_scan(**x, output_final_state=True, cu_seqlens=cu, backend=backend)
    for n, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        doc = {k: x[k][:, s:e] for k in ("v", "lambda_v", "k", "q")}
        init = tuple(st[n : n + 1] for st in x["initial_state"])
        dy, dyv, (dl, de) = kla_scan(**doc, a=x["a"], p=x["p"], initial_state=init, output_final_state=True, backend="naive")
        torch.testing.assert_close(y[:, s:e], dy, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(y_var[:, s:e], dyv, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lam[n : n + 1], dl, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(eta[n : n + 1], de, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("split", [1, 37, 99])
def test_split_sequence_carries_state(backend, split):
    x = make_inputs(2, 100, 2, 3, 4, regime="lv_wide", seed=22)
    y, y_var, state = kla_scan(**x, output_final_state=True, backend=backend)
    first = {k: x[k][:, :split] for k in ("v", "lambda_v", "k", "q")}
    second = {k: x[k][:, split:] for k in ("v", "lambda_v", "k", "q")}
    y1, yv1, mid = kla_scan(**first, a=x["a"], p=x["p"], initial_state=x["initial_state"], output_final_state=True, backend=backend)
    y2, yv2, end = kla_scan(**second, a=x["a"], p=x["p"], initial_state=mid, output_final_state=True, backend=backend)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.cat([yv1, yv2], 1), y_var, rtol=1e-10, atol=1e-12)
    for got, ref in zip(end, state):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_decode_steps_equal_one_scan():
    x = make_inputs(3, 25, 2, 3, 4, seed=23)
    y, y_var, final = kla_scan(**x, output_final_state=True, backend="naive")
    state = x["initial_state"]
    for t in range(25):
        step = [x[k][:, t] for k in ("v", "lambda_v", "k", "q")]
        yt, yvt, state = kla_decode_step(*step, x["a"], x["p"], state)
        torch.testing.assert_close(yt, y[:, t], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(yvt, y_var[:, t], rtol=1e-10, atol=1e-12)
    for got, ref in zip(state, final):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def _ou_by_van_loan(rate, delta, p):
    """Exact moments of the OU step dx = −rate·x dt + dw, E[dw²] = p dt, over Δ, from one matrix
    exponential (Van Loan): expm(Δ·[[rate, p], [0, −rate]]) = [[·, G₁₂], [0, G₂₂]] gives the
    mean factor ā = G₂₂ and the added variance p̄ = G₂₂·G₁₂."""
    m = torch.zeros(*rate.shape, 2, 2, dtype=torch.float64)
    m[..., 0, 0], m[..., 0, 1], m[..., 1, 1] = rate * delta, p * delta, -rate * delta
    g = torch.linalg.matrix_exp(m)
    return g[..., 1, 1], g[..., 1, 1] * g[..., 0, 1]


def _ou_by_moment_ode(rate, delta, p, steps=4000):
    """The same moments by RK4 on the moment ODEs ṁ = −rate·m (m(0) = 1), Ṗ = −2·rate·P + p (P(0) = 0)."""
    m, var, h = torch.ones_like(rate), torch.zeros_like(rate), delta / steps

    def f(m, var):
        return -rate * m, -2 * rate * var + p

    for _ in range(steps):
        k1 = f(m, var)
        k2 = f(m + h / 2 * k1[0], var + h / 2 * k1[1])
        k3 = f(m + h / 2 * k2[0], var + h / 2 * k2[1])
        k4 = f(m + h * k3[0], var + h * k3[1])
        m = m + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        var = var + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
    return m, var


def test_discretize_matches_ou_moments():
    """ā and p̄ are the exact one-step mean factor and added variance of the OU process with
    rate exp(A_log) and noise p over Δ (the layer's convention: Δ = softplus(Δ_raw) + 1e-7),
    checked against a matrix exponential and a fine RK4 integration of the moment ODEs."""
    A_log = torch.tensor([-2.0, 0.0, 1.5, 3.0, -4.0, 0.5], dtype=torch.float64)
    delta = torch.tensor([1e-4, 0.3, 2.0, 1e-2, 5.0, 1e-6], dtype=torch.float64)
    p = torch.tensor([0.01, 0.0, 3.0, 0.5, 2.0, 1.0], dtype=torch.float64)
    delta_raw = torch.log(torch.expm1(delta))  # softplus⁻¹, so softplus(Δ_raw) = Δ
    a_bar, p_bar = discretize(A_log, delta_raw, p)
    rate, step = torch.exp(A_log), delta + 1e-7
    for ref_a, ref_p in (_ou_by_van_loan(rate, step, p), _ou_by_moment_ode(rate, step, p)):
        torch.testing.assert_close(a_bar, ref_a, rtol=1e-10, atol=0)
        torch.testing.assert_close(p_bar, ref_p, rtol=1e-9, atol=0)
    assert ((a_bar > 0) & (a_bar <= 1)).all() and (p_bar >= 0).all()


def test_discretize_smallest_step_is_1e7():
    """A very negative Δ_raw still moves: Δ → 1e-7, so ā = exp(−rate·1e-7) < 1 and p̄ ≈ p·1e-7."""
    A_log, p = torch.tensor([0.0], dtype=torch.float64), torch.tensor([2.0], dtype=torch.float64)
    a_bar, p_bar = discretize(A_log, torch.tensor([-80.0], dtype=torch.float64), p)
    torch.testing.assert_close(-torch.log(a_bar), torch.tensor([1e-7], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(p_bar, p * 1e-7, rtol=1e-6, atol=0)


def _bad(**changes):
    x = make_inputs(1, 6, 2, 3, 4, seed=24)
    x.update(changes)
    return x


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(v=torch.randn(6, 2, 3, dtype=torch.float64)), r"`v` must be 4-D"),
        (dict(lambda_v=torch.ones(1, 6, 2, 4, dtype=torch.float64)), r"`lambda_v` must have shape \[1, 6, 2, 3\]"),
        (dict(q=torch.ones(1, 6, 2, 5, dtype=torch.float64)), r"`q` must have shape"),
        (dict(a=torch.ones(2, 3, 5, dtype=torch.float64)), r"`a` must have shape \[2, 3, 4\]"),
        (dict(lambda_v=torch.zeros(1, 6, 2, 3, dtype=torch.float64)), r"`lambda_v` must be positive"),
        (dict(a=torch.full((2, 3, 4), 1.5, dtype=torch.float64)), r"`a` must lie in \(0, 1\]"),
        (dict(a=torch.zeros(2, 3, 4, dtype=torch.float64)), r"`a` must lie in \(0, 1\]"),
        (dict(p=torch.full((2, 3, 4), -0.1, dtype=torch.float64)), r"`p` must be non-negative"),
        (dict(k=torch.ones(1, 6, 2, 4, dtype=torch.float32)), r"must share one float dtype"),
        (dict(a=torch.full((2, 3, 4), 0.5), p=torch.zeros(2, 3, 4)), r"a, p and the initial state must share|float64 must be used"),
        (dict(initial_state=(torch.ones(2, 2, 3, 4, dtype=torch.float64),) * 2), r"initial_state.lam` must have shape \[1, 2, 3, 4\]"),
    ],
    ids=["v-rank", "lv-shape", "q-shape", "a-shape", "lv-zero", "a-big", "a-zero", "p-neg", "dtype-mix", "state-dtype", "state-shape"],
)
def test_bad_inputs(changes, match):
    with pytest.raises(ValueError, match=match):
        kla_scan(**_bad(**changes), backend="torch")


@pytest.mark.parametrize(
    "cu,match",
    [
        ([0, 3, 2, 6], "increase strictly"),
        ([0, 3, 5], "end at L=6"),
        ([1, 6], "start at 0"),
        ([6], "1-D integer tensor"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    with pytest.raises(ValueError, match=match):
        kla_scan(**_bad(initial_state=None), cu_seqlens=torch.tensor(cu), backend="torch")


def test_cu_seqlens_needs_batch_one():
    x = make_inputs(2, 6, 2, 3, 4, seed=25, with_state=False)
    with pytest.raises(ValueError, match="batch size must be 1"):
        kla_scan(**x, cu_seqlens=torch.tensor([0, 6]))


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        kla_scan(**_bad(), backend="cuda")
