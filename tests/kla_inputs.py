"""Random KLA scan inputs in named regimes, and output+gradient collection for comparisons.

Regimes follow docs/kla.md#numerics: decay ``a`` near 0 and near 1, process noise ``p``
from 0 to 1e-2, value precision Λv from 1e-2 to 1e4.
"""
from __future__ import annotations

import math

import torch

REGIMES = {
    "default": dict(a=(0.5, 0.99), p=(1e-3, 0.1), lv=(0.1, 10.0)),
    "a_tiny": dict(a=(1e-3, 1e-3), p=(1e-3, 0.1), lv=(0.1, 10.0)),
    "a_near_one": dict(a=(1 - 1e-6, 1 - 1e-6), p=(1e-12, 1e-12), lv=(0.1, 10.0)),
    "a_one_p_zero": dict(a=(1.0, 1.0), p=(0.0, 0.0), lv=(0.1, 10.0)),
    "lv_small": dict(a=(0.5, 0.99), p=(1e-2, 1e-2), lv=(1e-2, 1e-2)),
    "lv_large": dict(a=(0.9, 0.9), p=(1e-2, 1e-2), lv=(1e4, 1e4)),
    "lv_wide": dict(a=(0.5, 0.999), p=(0.0, 1e-2), lv=(1e-2, 1e4)),
}


def _uniform(shape, lo, hi, gen, dtype, log=False):
    u = torch.rand(shape, generator=gen, dtype=torch.float64)
    if log and lo > 0:
        x = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    else:
        x = lo + u * (hi - lo)
    return x.to(dtype)


def make_inputs(B, L, H, P, S, regime="default", seed=0, n_seq=None, with_state=True, dtype=torch.float64):
    """Returns dict(v, lambda_v, k, q, a, p, initial_state) in ``dtype`` (a, p, state float64 if
    dtype is float64, else float32)."""
    r = REGIMES[regime]
    gen = torch.Generator().manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    k = torch.randn(B, L, H, S, generator=gen, dtype=torch.float64)
    q = torch.randn(B, L, H, S, generator=gen, dtype=torch.float64)
    out = dict(
        v=torch.randn(B, L, H, P, generator=gen, dtype=torch.float64).to(dtype),
        lambda_v=_uniform((B, L, H, P), *r["lv"], gen, dtype, log=True),
        k=(k / k.norm(dim=-1, keepdim=True)).to(dtype),
        q=(q / q.norm(dim=-1, keepdim=True)).to(dtype),
        a=_uniform((H, P, S), *r["a"], gen, sdt),
        p=_uniform((H, P, S), *r["p"], gen, sdt, log=True),
        initial_state=None,
    )
    if with_state:
        n = B if n_seq is None else n_seq
        lam0 = _uniform((n, H, P, S), 0.5, 4.0, gen, sdt)
        eta0 = torch.randn(n, H, P, S, generator=gen, dtype=torch.float64).to(sdt)
        out["initial_state"] = (lam0, eta0)
    return out


def upcast(inputs):
    """float64 copy of (lower-precision) inputs: the reference must see the same rounded
    values, or input quantisation (a = 1 − 1e-6 in fp32, raised to the power L) dominates."""
    out = {k: (v.double() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    if inputs["initial_state"] is not None:
        out["initial_state"] = tuple(s.double() for s in inputs["initial_state"])
    return out


GRAD_NAMES = ("v", "lambda_v", "k", "q", "a", "p", "lam0", "eta0")


def outputs_and_grads(scan, inputs, seed=1, **kw):
    """Run ``scan`` with grads on; backprop random cotangents of y, y_var and the final state.

    Returns (outputs, grads): outputs = {y, y_var, lam, eta} and grads keyed by GRAD_NAMES,
    all as float64 tensors.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if k != "initial_state"}
    state = None
    if inputs["initial_state"] is not None:
        state = tuple(s.detach().clone().requires_grad_(True) for s in inputs["initial_state"])
    y, y_var, (lam, eta) = scan(**leaves, initial_state=state, output_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    outs = {"y": y, "y_var": y_var, "lam": lam, "eta": eta}
    outs = {name: o for name, o in outs.items() if o is not None}  # y_var without output_variance
    for name, o in outs.items():
        w = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device=o.device, dtype=o.dtype)
        # Scale cotangents so every term contributes comparably to the loss.
        loss = loss + (w * o).sum() / (o.detach().abs().mean() + 1e-30)
    loss.backward()
    grads = {k: leaves[k].grad for k in ("v", "lambda_v", "k", "q", "a", "p")}
    if state is not None:
        grads["lam0"], grads["eta0"] = state[0].grad, state[1].grad
    return (
        {k: o.detach().double() for k, o in outs.items()},
        {k: g.double() for k, g in grads.items()},
    )


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Normwise relative error ‖x − ref‖ / ‖ref‖ (NaN counts as failure)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close_all(got: dict, ref: dict, tol: float, what=""):
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    bad = {k: e for k, e in errs.items() if not e <= tol}
    assert not bad, f"{what}: relative errors above {tol:g}: {bad} (all: {errs})"
