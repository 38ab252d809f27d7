"""Context-parallel KLA scan (parallel/context_parallel.py) on CPU gloo ranks equals the
single-process scan in outputs, final state and every gradient."""
import functools
import zlib

import pytest
import torch
import torch.distributed as dist

from kla_megatron.ops.kla import kla_scan
from kla_megatron.parallel import context_parallel as cpmod
from kla_megatron.parallel.context_parallel import cp_kla_scan
from kla_megatron.parallel.sharding import shard, unshard
from tests.dist_utils import run_on_ranks

H, P, S = 2, 3, 2

# name -> (B, L, a range, p range, cu_seqlens, with initial state, dtype, backend)
CASES = {
    "plain": (2, 24, (0.6, 1.0), (0.0, 0.05), None, False, torch.float64, "naive"),
    "long-memory-init": (2, 24, (1 - 1e-6, 1.0), (0.0, 1e-12), None, True, torch.float64, "naive"),
    "packed-crossing": (1, 48, (0.8, 1.0), (0.0, 0.02), [0, 5, 6, 19, 31, 48], True, torch.float64, "naive"),
    "fp32-torch": (2, 32, (0.9, 1.0), (0.0, 0.01), None, True, torch.float32, "torch"),
    "fp32-packed-torch": (1, 32, (0.9, 1.0), (0.0, 0.01), [0, 3, 16, 32], False, torch.float32, "torch"),
}


def make_case(name):
    B, L, (a0, a1), (p0, p1), cu, with_init, dtype, backend = CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    u = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64)
    n_seq = B if cu is None else len(cu) - 1
    x = dict(
        v=r(B, L, H, P), lambda_v=u(B, L, H, P) * 2 + 0.05, k=r(B, L, H, S), q=r(B, L, H, S),
        a=a0 + (a1 - a0) * u(H, P, S), p=p0 + (p1 - p0) * u(H, P, S),
        gy=r(B, L, H, P), gv=r(B, L, H, P), dlam=r(n_seq, H, P, S), deta=r(n_seq, H, P, S),
    )
    if with_init:
        x["lam0"], x["eta0"] = u(n_seq, H, P, S) + 0.5, r(n_seq, H, P, S)
    x = {key: val.to(dtype) for key, val in x.items()}
    return x, (None if cu is None else torch.tensor(cu)), backend


NAMES = ("v", "lambda_v", "k", "q", "a", "p", "lam0", "eta0")


def run_scan(x, cu, backend, scan):
    """Forward + backward of a fixed linear loss; returns outputs and gradients by name."""
    leaves = {n: x[n].clone().requires_grad_() for n in NAMES if n in x}
    init = (leaves["lam0"], leaves["eta0"]) if "lam0" in leaves else None
    y, y_var, (lam, eta) = scan(
        *(leaves[n] for n in NAMES[:6]), initial_state=init, output_final_state=True, cu_seqlens=cu, backend=backend
    )
    loss = (y * x["gy_local"]).sum() + (y_var * x["gv_local"]).sum() + (lam * x["dlam"]).sum() + (eta * x["deta"]).sum()
    loss.backward()
    out = {"y": y.detach(), "y_var": y_var.detach(), "lam": lam.detach(), "eta": eta.detach()}
    out.update({"d" + n: leaf.grad for n, leaf in leaves.items()})
    return out


def reference(name):
    x, cu, backend = make_case(name)
    x["gy_local"], x["gv_local"] = x["gy"], x["gv"]
    return run_scan(x, cu, backend, kla_scan)


def _neutral_exchange(t, group):
    """CONTROL: every rank sees only its own carries; the others are identity / zero."""
    out = cpmod._exchange_real(t, group)
    rank = dist.get_rank(group)
    for r in range(out.shape[0]):
        if r != rank:
            if out.shape[2] == 7:  # transforms -> identity
                out[r] = 0
                out[r][:, [0, 3, 6]] = 1
            else:  # adjoint maps -> zero
                out[r] = 0
    return out


def cp_body(rank, world, configs, with_conv_attention=False):
    """Run every (layout, control, names) config in one spawn (process start-up dominates);
    the 4-rank spawn also runs the conv-halo / attention bodies of test_cp_conv_attention."""
    cpmod._exchange_real = cpmod._exchange
    results = {}
    for layout, control, names in configs:
        cpmod._exchange = _neutral_exchange if control else cpmod._exchange_real
        results[(layout, control)] = _cp_cases(rank, world, names, layout)
    cpmod._exchange = cpmod._exchange_real
    if with_conv_attention:
        from tests import test_cp_conv_attention

        results["conv_attention"] = test_cp_conv_attention.body(rank, world)
    return results


def _cp_cases(rank, world, names, layout):
    results = {}
    for name in names:
        x, cu, backend = make_case(name)
        local = {n: (shard(x[n], rank, world, layout) if n in ("v", "lambda_v", "k", "q") else x[n]) for n in x}
        local["gy_local"] = shard(x["gy"], rank, world, layout)
        local["gv_local"] = shard(x["gv"], rank, world, layout)
        scan = functools.partial(cp_kla_scan, cp_group=dist.group.WORLD, layout=layout)
        out = run_scan(local, cu, backend, scan)
        with torch.no_grad():  # evaluation path: no graph kept, same outputs
            y_eval = scan(*(local[n] for n in NAMES[:6]), cu_seqlens=cu, backend=backend,
                          initial_state=(local["lam0"], local["eta0"]) if "lam0" in local else None)[0]
        out["no_grad_matches"] = bool(torch.equal(y_eval, out["y"]))
        for n in ("da", "dp", "dlam0", "deta0"):
            if n in out:
                dist.all_reduce(out[n])  # the DP+CP gradient reduction
        results[name] = out
    return results


SHARDED = ("y", "y_var", "dv", "dlambda_v", "dk", "dq")


def compare(name, per_rank, layout):
    ref = reference(name)
    dtype = CASES[name][6]
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    assert all(r[name]["no_grad_matches"] for r in per_rank), f"{name}: forward under no_grad differs"
    for key, want in ref.items():
        if key in SHARDED:
            got = unshard([r[name][key] for r in per_rank], layout)
        else:
            got = per_rank[0][name][key]
            for r in per_rank[1:]:
                torch.testing.assert_close(r[name][key], got, rtol=0, atol=0)  # replicated values
        scale = want.abs().max().clamp_min(1.0)
        torch.testing.assert_close(got / scale, want / scale, **tol, msg=lambda m: f"{name}/{key}: {m}")


_RUNS = {}


def cp_results(world):
    """All CP runs for one world size, spawned once and shared by the tests below."""
    if world not in _RUNS:
        names = list(CASES)
        if world == 2:
            configs = [("contiguous", False, names), ("load_balanced", False, names),
                       ("load_balanced", True, ["long-memory-init"])]
        else:
            configs = [("contiguous", False, ["long-memory-init", "packed-crossing"]),
                       ("load_balanced", False, ["long-memory-init", "packed-crossing", "fp32-packed-torch"])]
        _RUNS[world] = run_on_ranks(cp_body, world_size=world, args=(configs, world == 4))
    return _RUNS[world]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "load_balanced"])
def test_cp_scan_equals_single_process(world, layout):
    per_rank = [r[(layout, False)] for r in cp_results(world)]
    for name in per_rank[0]:
        compare(name, per_rank, layout)


def test_control_zeroed_carries_fail():
    """Without the exchanged carries the equality must break, forward and backward."""
    per_rank = [r[("load_balanced", True)] for r in cp_results(2)]
    with pytest.raises(AssertionError, match="long-memory-init/y"):
        compare("long-memory-init", per_rank, "load_balanced")
    ref = reference("long-memory-init")
    got = unshard([r["long-memory-init"]["dv"] for r in per_rank], "load_balanced")
    assert not torch.allclose(got, ref["dv"], rtol=1e-3, atol=1e-3)
