"""GPU versions of the context-parallel tests (run by the lead on H200s; skipped without CUDA).

- ``gpu``: the chunk summaries (transform, end-adjoint maps) on CUDA in fp32 match the float64
  CPU reference (whichever implementation ``ops/kla/carry.py`` dispatches to, e.g. Triton).
- ``multigpu``: the CP scan over NCCL (CP = 2, and 4 when available), local scans on the Triton
  backend in fp32, equals the float64 single-process scan; the CP=2 model test over NCCL.
"""
import pytest
import torch
import torch.distributed as dist

from kla_megatron.ops.kla import kla_scan
from kla_megatron.ops.kla import transform as tr
from kla_megatron.ops.kla.carry import chunk_transforms, end_adjoint_maps
from tests import test_cp_scan as cs
from tests.test_cp_carry import _reference_maps, make_inputs, random_state


@pytest.mark.gpu
@pytest.mark.parametrize("L", [63, 1000, 4096])
def test_carry_summaries_on_cuda_match_fp64(L):
    v, lv, k, q, a, p = make_inputs(2, L, 0.9, 1.0, 0.0, 0.01)
    state = random_state(2)
    g = torch.Generator().manual_seed(5)
    gy, gv = (torch.randn(2, L, cs.H, cs.P, generator=g, dtype=torch.float64) for _ in range(2))
    cuda = lambda x: x.float().cuda()
    T = chunk_transforms(*(cuda(x) for x in (v * lv, lv, k, a, p)))
    lam, eta = tr.apply(T.double().cpu(), *state)
    _, _, (lam_ref, eta_ref) = kla_scan(v, lv, k, q, a, p, initial_state=state, output_final_state=True, backend="naive")
    torch.testing.assert_close(lam, lam_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(eta / lam, eta_ref / lam_ref, rtol=1e-3, atol=1e-3)
    Q, o = end_adjoint_maps(*(cuda(x) for x in (v, lv, k, q, a, p, gy, gv)), tuple(cuda(s) for s in state))
    Q_ref, o_ref = _reference_maps(v, lv, k, q, a, p, gy, gv, state, tuple(torch.zeros_like(s) for s in state))
    torch.testing.assert_close(Q.double().cpu(), Q_ref, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(o.double().cpu(), o_ref, rtol=1e-3, atol=1e-3 * o_ref.abs().max().item())


def _cp_cuda_body(rank, world):
    results = {}
    for layout in ("contiguous", "load_balanced"):
        out = {}
        for name in ("long-memory-init", "packed-crossing", "fp32-torch"):
            x, cu, _ = cs.make_case(name)
            x = {n: t.float().cuda() for n, t in x.items()}
            local = {n: (cs.shard(x[n], rank, world, layout) if n in ("v", "lambda_v", "k", "q") else x[n]) for n in x}
            local["gy_local"] = cs.shard(x["gy"], rank, world, layout)
            local["gv_local"] = cs.shard(x["gv"], rank, world, layout)
            scan = lambda *a, **kw: cs.cp_kla_scan(*a, cp_group=dist.group.WORLD, layout=layout, **kw)
            res = cs.run_scan(local, None if cu is None else cu.cuda(), "triton", scan)
            for n in ("da", "dp", "dlam0", "deta0"):
                if n in res:
                    dist.all_reduce(res[n])
            out[name] = {n: t.double().cpu() for n, t in res.items()}
        results[layout] = out
    return results


@pytest.mark.gpu
@pytest.mark.multigpu
def test_cp_scan_nccl_matches_fp64(tmp_path):
    from tests.test_model_gpu import run_nccl

    world = 4 if torch.cuda.device_count() >= 4 else 2
    per_rank = run_nccl(_cp_cuda_body, world, tmp_path)
    for layout in ("contiguous", "load_balanced"):
        for name in per_rank[0][layout]:
            ref = cs.reference(name)
            for key, want in ref.items():
                if key in cs.SHARDED:
                    got = cs.unshard([r[layout][name][key] for r in per_rank], layout)
                else:
                    got = per_rank[0][layout][name][key]
                scale = want.abs().max().clamp_min(1.0)
                torch.testing.assert_close(got.to(want.dtype) / scale, want / scale, rtol=2e-3, atol=2e-3,
                                           msg=lambda m: f"{layout}/{name}/{key}: {m}")


def _model_cuda_body(rank, world):
    import tests.test_cp_model as cm

    return cm._body(rank, world, device="cuda")


@pytest.mark.gpu
@pytest.mark.multigpu
def test_cp_model_nccl_matches_single_gpu(tmp_path):
    from tests.test_model_gpu import run_nccl
    import tests.test_cp_model as cm

    if torch.cuda.device_count() < 4:
        pytest.skip("the CP model layouts need 4 GPUs (TP=2×CP=2)")
    results = run_nccl(_model_cuda_body, 4, tmp_path)
    for layout in ("cp2", "tp2_cp2"):
        for key in cm.PATTERNS:
            cm.test_cp_model_matches_single_process(results, layout, key)
