"""The Triton scan under torch.compile and CUDA graphs (kla_megatron/ops/kla/triton_scan.py).

CPU (kernels through TRITON_INTERPRET=1, tiny sizes):
- ``torch.compile(fullgraph=True, backend="aot_eager")`` over the scan (one pass, packed
  documents, time split) gives eager's outputs and gradients: fullgraph proves no graph break,
  aot_eager runs the fake implementations and the autograd formulas of the custom ops;
- ``torch.library.opcheck`` on the four ops;
- a KLA layer compiles with graph breaks only inside megatron-core's RowParallelLinear (see
  ``_MEGATRON_BREAK``) and matches eager, unpacked and packed.

GPU (``gpu`` mark): forward + backward captured in one ``torch.cuda.CUDAGraph`` replays to
eager's result bitwise (one pass, time split, packed); ``torch.compile(fullgraph=True)`` with
inductor matches eager; a KLA layer under inductor with ``mode="reduce-overhead"`` (CUDA
graphs) matches eager, unpacked and packed.
"""
import functools
import warnings

import pytest
import torch

from kla_megatron.ops.kla import kla_scan
from kla_megatron.ops.kla.chunk import kla_fwd
from kla_megatron.ops.kla.chunk_split import choose_segment_len
from kla_megatron.ops.kla.triton_scan import triton_kla_scan

from . import test_model_helpers as h
from .dist_utils import run_on_ranks
from .kla_inputs import GRAD_NAMES, assert_close_all, make_inputs, outputs_and_grads

# megatron-core 0.16's RowParallelLinear passes tp_group=None and so calls warnings.warn with a
# category (not reorderable by dynamo): a graph break in out_proj, outside our code.
_MEGATRON_BREAK = "megatron/core/tensor_parallel/layers.py"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _to(x, device=DEVICE):
    out = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in x.items()}
    if x["initial_state"] is not None:
        out["initial_state"] = tuple(s.to(device) for s in x["initial_state"])
    return out


def _split_scan(v, lambda_v, k, q, a, p, initial_state=None, output_final_state=False, **kw):
    return triton_kla_scan(v, lambda_v, k, q, a, p, initial_state, output_final_state, segment_len=32, **kw)


def _scan_fns():
    """(inputs, scan) per path; kla_scan picks no split at these sizes (too short to split)."""
    triton = functools.partial(kla_scan, backend="triton", check_values=False, deterministic=True)
    x = _to(make_inputs(2, 37, 2, 3, 4, seed=51, dtype=torch.float32))
    packed = _to(make_inputs(1, 40, 2, 3, 4, regime="lv_wide", seed=52, n_seq=3, dtype=torch.float32))
    cu = torch.tensor([0, 9, 10, 40], device=DEVICE)
    split = _to(make_inputs(2, 70, 1, 3, 2, seed=53, dtype=torch.float32, with_state=False))
    return {
        "one-pass": (x, triton),
        "packed": (packed, functools.partial(triton, cu_seqlens=cu)),
        "time-split": (split, functools.partial(_split_scan, deterministic=True)),
    }


@pytest.mark.parametrize("path", ["one-pass", "packed", "time-split"])
def test_compiled_scan_matches_eager(path):
    x, scan = _scan_fns()[path]
    eager_out, eager_grad = outputs_and_grads(scan, x)
    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out, grad = outputs_and_grads(compiled, x)
    assert_close_all(out, eager_out, 1e-6, f"{path} outputs")
    assert_close_all(grad, eager_grad, 1e-6, f"{path} grads")


def test_compiled_scan_without_grad_or_final_state():
    x = _to(make_inputs(2, 20, 2, 3, 4, seed=54, dtype=torch.float32))
    scan = functools.partial(kla_scan, backend="triton", check_values=False)
    compiled = torch.compile(scan, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        y, y_var, final = compiled(**x)
        ry, ryv, _ = scan(**x)
    assert final is None
    torch.testing.assert_close(y, ry, rtol=0, atol=0)
    torch.testing.assert_close(y_var, ryv, rtol=0, atol=0)


def _op_args(x, rows=None):
    """v, λv, k, q (the first ``rows`` rows), a, p of make_inputs, as leaves that need grads."""
    args = [x[k][:rows] for k in ("v", "lambda_v", "k", "q")] + [x["a"], x["p"]]
    return [a.detach().clone().requires_grad_() for a in args]


# The forward ops' checkpoint outputs have padding slots the kernel never writes
# (uninitialized memory), so opcheck's eager-vs-AOT output comparison would fail on garbage;
# test_compiled_scan_matches_eager covers AOT dispatch for them instead.
_FWD_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_custom_ops_pass_opcheck():
    x = _to(make_inputs(2, 40, 1, 3, 2, seed=55, dtype=torch.float32))
    lam0, eta0 = x["initial_state"]
    args = _op_args(x)
    cu = torch.tensor([0, 5, 40], device=DEVICE)
    fwd = torch.ops.kla.chunk_fwd
    torch.library.opcheck(fwd, (*args, lam0, eta0, None, True, True, False, True), test_utils=_FWD_CHECKS)
    torch.library.opcheck(fwd, (*args, None, None, None, False, True, True, False), test_utils=_FWD_CHECKS)
    torch.library.opcheck(fwd, (*_op_args(x, rows=1), None, None, cu, True, True, False, True),
                          test_utils=_FWD_CHECKS)
    torch.library.opcheck(torch.ops.kla.split_fwd, (*args, lam0, eta0, 32, False, True), test_utils=_FWD_CHECKS)
    torch.library.opcheck(torch.ops.kla.split_fwd, (*args, lam0, eta0, 32, False, False), test_utils=_FWD_CHECKS)

    # Backward ops: all checks, on saved tensors from a real forward.
    plain = [a.detach() for a in args]
    y, _, final, ck = kla_fwd(*plain, lam0, eta0, None, True, True)
    gy, gl = torch.randn_like(y), torch.randn_like(final[0])
    torch.library.opcheck(torch.ops.kla.chunk_bwd, (*plain, lam0, eta0, *final, *ck, None, gy, gy, gl, gl, True))
    torch.library.opcheck(torch.ops.kla.chunk_bwd, (*plain, None, None, None, None, *ck, None, gy, gy, None, None,
                                                    True))
    torch.library.opcheck(torch.ops.kla.chunk_bwd, (*plain, None, None, None, None, *ck, None, gy, None, None, None,
                                                    True))
    saved = torch.ops.kla.split_fwd(*plain, lam0, eta0, 32, True, True)
    torch.library.opcheck(torch.ops.kla.split_bwd, (*plain, *saved[4:6], *saved[2:4], *saved[6:], gy, gy, gl, gl,
                                                    32, True))


# ----------------------------------------------------------------------------- the layer


def _layer_inputs(device, packed):
    from megatron.core.packed_seq_params import PackedSeqParams

    gen = torch.Generator().manual_seed(7)
    if not packed:
        return torch.randn(h.SEQ, 2, 16, generator=gen).to(device), {}
    cu = torch.tensor([0, 3, h.SEQ], dtype=torch.int32, device=device)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=5, max_seqlen_kv=5)
    return torch.randn(h.SEQ, 1, 16, generator=gen).to(device), dict(packed_seq_params=params)


def _layer_step(layer, x, kw, run=None):
    """Output and gradients (input and every parameter) of one forward + backward of ``run``
    (default: ``layer``; a compiled wrapper of it otherwise)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out, _ = (layer if run is None else run)(x, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(8)).to(out.device)
    (out * w).sum().backward()
    return {"out": out.detach().clone(), "x": x.grad.clone(),
            **{n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}}


def _build_layer(device):
    h.setup_parallel(1, 1)
    model = h.build(h.tiny_config("K", "plain"), dtype=torch.float32, runtime_config=h.runtime("triton")).to(device)
    h.det_init(model)
    return model.decoder.layers[0]


def _compile_layer_body(rank, world_size):
    import torch._dynamo

    layer = _build_layer(DEVICE)
    out = {}
    for packed in (False, True):
        x, kw = _layer_inputs(DEVICE, packed)
        torch._dynamo.reset()
        explained = torch._dynamo.explain(layer)(x, **kw)
        breaks = ["".join(f"{f.filename}:{f.lineno} " for f in b.user_stack) for b in explained.break_reasons]
        compiled = torch.compile(layer, backend="aot_eager")
        steps = dict(eager=_layer_step(layer, x, kw), compiled=_layer_step(layer, x, kw, compiled))
        out[packed] = dict(breaks=breaks, **{k: {n: t.cpu() for n, t in r.items()} for k, r in steps.items()})
    return out


@pytest.fixture(scope="module")
def compiled_layer():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_on_ranks(_compile_layer_body, world_size=1)[0]


@pytest.mark.parametrize("packed", [False, True], ids=["unpacked", "packed"])
def test_layer_compiles_without_breaks_in_kla_code(compiled_layer, packed):
    res = compiled_layer[packed]
    assert all(_MEGATRON_BREAK in stack for stack in res["breaks"]), res["breaks"]
    assert sorted(res["compiled"]) == sorted(res["eager"])
    assert_close_all(res["compiled"], res["eager"], 1e-6, "compiled layer")


# ----------------------------------------------------------------------------- GPU


def _graph_scan(path, L=512):
    x = make_inputs(2 if path != "packed" else 1, L, 2, 16, 16, regime="lv_wide", seed=56, dtype=torch.float32,
                    n_seq=3 if path == "packed" else None)
    x = _to(x, "cuda")
    scan = functools.partial(kla_scan, backend="triton", check_values=False, deterministic=True)
    if path == "one-pass":
        scan = functools.partial(triton_kla_scan, deterministic=True, segment_len=L)
    elif path == "packed":
        scan = functools.partial(scan, cu_seqlens=torch.tensor([0, 100, 101, L], device="cuda"))
    else:  # few programs and a long row: kla_scan splits time by itself
        assert choose_segment_len(2 * 2, L, torch.device("cuda")) is not None
    return x, scan


def _scan_step(scan, leaves, state, weights):
    y, y_var, (lam, eta) = scan(*leaves, initial_state=state, output_final_state=True)
    loss = sum((w * o).sum() for w, o in zip(weights, (y, y_var, lam, eta)))
    return (y, y_var, lam, eta, *torch.autograd.grad(loss, (*leaves, *state)))


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["one-pass", "packed", "time-split"])
def test_gpu_cuda_graph_capture_replays_forward_and_backward(path):
    x, scan = _graph_scan(path)
    names = ("v", "lambda_v", "k", "q", "a", "p")
    leaves = [x[n].clone().requires_grad_() for n in names]
    state = [s.clone().requires_grad_() for s in x["initial_state"]]
    n_seq = state[0].shape[0]
    shapes = (x["v"].shape, x["v"].shape, state[0].shape, state[0].shape)
    gen = torch.Generator().manual_seed(9)
    weights = [torch.randn(s, generator=gen).cuda() for s in shapes]
    assert n_seq == (3 if path == "packed" else 2)

    side = torch.cuda.Stream()  # warm-up (Triton compiles, allocator settles) off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _scan_step(scan, leaves, state, weights)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _scan_step(scan, leaves, state, weights)

    # Replay on new inputs copied into the captured ones, then compare with an eager run.
    fresh = make_inputs(*x["v"].shape[:3], 16, 16, regime="lv_wide", seed=57, dtype=torch.float32,
                        n_seq=n_seq if path == "packed" else None)
    with torch.no_grad():
        for leaf, name in zip(leaves, names):
            leaf.copy_(fresh[name])
        for s, new in zip(state, fresh["initial_state"]):
            s.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    eager = _scan_step(scan, leaves, state, weights)
    for name, got, ref in zip(("y", "y_var", "lam", "eta", *GRAD_NAMES), static, eager):
        assert torch.equal(got, ref), f"{path}: {name} differs after replay"


@pytest.mark.gpu
@pytest.mark.parametrize("path", ["one-pass", "packed", "time-split"])
def test_gpu_inductor_fullgraph_scan_matches_eager(path):
    """Inductor around the ops (and, on the time-split path, the SM-count lookup)."""
    x, scan = _graph_scan(path)
    eager_out, eager_grad = outputs_and_grads(scan, x)
    out, grad = outputs_and_grads(torch.compile(scan, fullgraph=True), x)
    assert_close_all(out, eager_out, 1e-6, f"{path} outputs")
    assert_close_all(grad, eager_grad, 1e-6, f"{path} grads")


def _reduce_overhead_body(rank, world_size):
    from torch._dynamo.utils import counters

    layer = _build_layer("cuda")
    out = {}
    for packed in (False, True):
        x, kw = _layer_inputs("cuda", packed)
        compiled = torch.compile(layer, mode="reduce-overhead")
        eager = _layer_step(layer, x, kw)
        for _ in range(3):  # record, then replay the CUDA graphs
            torch.compiler.cudagraph_mark_step_begin()
            got = _layer_step(layer, x, kw, compiled)
        out[packed] = {k: v.cpu() for k, v in got.items()}, {k: v.cpu() for k, v in eager.items()}
    return out, dict(counters["inductor"])


@pytest.mark.gpu
def test_gpu_layer_reduce_overhead_matches_eager(tmp_path):
    from .test_model_gpu import run_nccl

    results, inductor = run_nccl(_reduce_overhead_body, 1, tmp_path)[0]
    assert inductor.get("cudagraph_skips", 0) == 0, inductor  # the graphs did run as CUDA graphs
    for packed, (got, ref) in results.items():
        assert sorted(got) == sorted(ref)
        assert_close_all(got, ref, 1e-5, f"reduce-overhead layer (packed={packed})")
