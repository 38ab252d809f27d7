"""causal_conv1d (kla_megatron/ops/conv) against an independent float64 reference.

The reference is ``F.conv1d`` (groups = M) with explicit left padding, each document behind its
own K-1 columns of context (the window for the first one only, as far as its position says).
Both backends are compared on y, new_window and the gradients of x, weight, bias and window.

CPU: the PyTorch path over the whole grid of lengths, taps, window, documents, activation and
strided x; the Triton kernels through TRITON_INTERPRET=1 (conftest) at small sizes, some with
blocks small enough for several channel blocks and time segments; torch.compile
(fullgraph, aot_eager) and opcheck of the custom ops. GPU (``gpu`` mark): B2·L4096·M4096 bf16
and fp32, deterministic backward, CUDA-graph capture, inductor.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from kla_megatron.ops.conv import causal_conv1d
from kla_megatron.ops.conv import triton_conv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GRADS = ("x", "weight", "bias", "window")


# ----------------------------------------------------------------------------- reference


def reference(x, weight, bias, window, position_in_doc, activation):
    """float64 (y, new_window) by one F.conv1d (groups = M, no padding) over the documents laid
    end to end, each behind its own K-1 columns of left context: every document is convolved
    on its own."""
    x = x.double()
    B, L, M = x.shape
    K = weight.shape[-1]
    past = window.double() if window is not None else x.new_zeros(B, M, K - 1)
    pos = position_in_doc.tolist() if position_in_doc is not None else None
    starts = [0] + ([t for t in range(1, L) if pos[t] == 0] if pos is not None else [])
    columns, keep = [], []
    for s, e in zip(starts, starts[1:] + [L]):
        # Context: the window's last min(pos, K-1) inputs for a document already under way at
        # t = 0, nothing for one starting inside x; zeros before that.
        n_ctx = (K - 1 if pos is None else min(pos[0], K - 1)) if s == 0 else 0
        ctx = F.pad(past[..., K - 1 - n_ctx:], (K - 1 - n_ctx, 0))
        offset = sum(c.shape[-1] for c in columns) + K - 1
        columns += [ctx, x[:, s:e].transpose(1, 2)]
        keep += range(offset - (K - 1), offset - (K - 1) + e - s)  # conv output i ends at input i+K-1
    b = bias.double() if bias is not None else None
    y = F.conv1d(torch.cat(columns, dim=-1), weight.double().reshape(M, 1, K), b, groups=M)[..., keep]
    y = y.transpose(1, 2)
    if activation == "silu":
        y = F.silu(y)
    return y, torch.cat([past, x.transpose(1, 2)], dim=-1)[..., L:]


def positions(L, gen, offset=0, n_docs=None):
    """``[L]`` positions in documents of a packed row whose first ``offset`` tokens lie before
    x (so the first document may be under way at t = 0); includes two 1-token documents."""
    total = L + offset
    starts = torch.zeros(total, dtype=torch.bool)
    starts[0] = True
    if total > 1:
        n = n_docs if n_docs is not None else max(1, total // 6)
        starts[torch.randperm(total - 1, generator=gen)[:n] + 1] = True
    if total > 4:
        c = int(torch.randint(1, total - 2, (1,), generator=gen))
        starts[c : c + 3] = True  # documents [c, c+1) and [c+1, c+2)
    idx = torch.arange(total)
    return (idx - torch.where(starts, idx, 0).cummax(0).values)[offset:]


# ----------------------------------------------------------------------------- harness


def make_case(B, L, M, K, *, window, docs, strided, seed, dtype=torch.float32, device=DEVICE, n_docs=None):
    gen = torch.Generator().manual_seed(seed)
    if strided:  # the z half of an in_proj output [L, B, 2M]
        x = torch.randn(L, B, 2 * M, generator=gen).to(dtype).transpose(0, 1)[..., :M]
    else:
        x = torch.randn(B, L, M, generator=gen).to(dtype)
    case = dict(
        x=x,
        weight=(torch.randn(M, 1, K, generator=gen) / K**0.5).to(dtype),
        bias=torch.randn(M, generator=gen).to(dtype),
        window=torch.randn(B, M, K - 1, generator=gen).to(dtype) if window else None,
        position_in_doc=None,
    )
    if docs:
        offset = int(torch.randint(0, 6, (1,), generator=gen))
        case["position_in_doc"] = positions(L, gen, offset, n_docs)
    cot = (torch.randn(B, L, M, generator=gen).to(dtype), torch.randn(B, M, K - 1, generator=gen).to(dtype))
    return {k: (v.to(device) if v is not None else None) for k, v in case.items()}, [c.to(device) for c in cot]


def outputs_and_grads(fn, case, cotangents, activation):
    """y, new_window and the gradients of the loss Σ y·gy + Σ new_window·gw."""
    # detach keeps a strided x strided: the op sees the view
    leaves = {k: case[k].detach().requires_grad_() if case[k] is not None else None for k in GRADS}
    y, new = fn(leaves["x"], leaves["weight"], leaves["bias"], window=leaves["window"],
                position_in_doc=case["position_in_doc"], activation=activation)
    loss = (y.double() * cotangents[0].double()).sum() + (new.double() * cotangents[1].double()).sum()
    present = [k for k in GRADS if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present], allow_unused=True)
    out = {"y": y, "new_window": new}
    for k, g in zip(present, grads):
        out["d" + k] = torch.zeros_like(leaves[k]) if g is None else g  # K = 1: window unused
    return out


def rel_err(got, ref):
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).norm() / ref.norm().clamp_min(1e-12))


def check(case, cot, activation, tol, backend):
    ref_case = {k: (v.detach().cpu().double() if v is not None and v.is_floating_point() else v)
                for k, v in case.items()}
    ref_case["position_in_doc"] = case["position_in_doc"].cpu() if case["position_in_doc"] is not None else None
    ref = outputs_and_grads(lambda x, w, b, **kw: reference(x, w, b, kw["window"], kw["position_in_doc"],
                                                            kw["activation"]),
                            ref_case, [c.cpu() for c in cot], activation)
    got = outputs_and_grads(lambda *a, **kw: causal_conv1d(*a, backend=backend, **kw), case, cot, activation)
    assert sorted(got) == sorted(ref)
    assert got["y"].dtype == case["x"].dtype and got["y"].is_contiguous()
    assert got["dx"].shape == case["x"].shape
    for name in ref:
        if ref[name].numel():
            assert rel_err(got[name], ref[name]) < tol, f"{backend}: {name} rel err {rel_err(got[name], ref[name])}"


# ----------------------------------------------------------------------------- CPU: torch path

GRID = list(itertools.product([1, 3, 63, 257], [1, 2, 3, 4], [False, True], [False, True], [None, "silu"]))


@pytest.mark.parametrize(
    "L,K,window,docs,activation", GRID,
    ids=[f"L{L}-K{K}-{'win' if w else 'nowin'}-{'docs' if d else 'nodocs'}-{a}" for L, K, w, d, a in GRID],
)
def test_torch_path_matches_reference(L, K, window, docs, activation):
    seed = GRID.index((L, K, window, docs, activation))
    case, cot = make_case(2, L, 6, K, window=window, docs=docs, strided=L % 2 == 1, seed=seed,
                          dtype=torch.float64, device="cpu")
    check(case, cot, activation, 1e-12, "torch")


def test_reference_detects_reversed_taps():
    """Negative control: flipping the tap order must fail the tolerance used above."""
    case, _ = make_case(1, 20, 4, 3, window=True, docs=True, strided=False, seed=3, dtype=torch.float64, device="cpu")
    ref, _ = reference(case["x"], case["weight"], case["bias"], case["window"], case["position_in_doc"], None)
    flipped, _ = causal_conv1d(case["x"], case["weight"].flip(-1), case["bias"], window=case["window"],
                               position_in_doc=case["position_in_doc"], backend="torch")
    assert rel_err(flipped, ref) > 0.1


# ----------------------------------------------------------------------------- Triton kernels

# Several channel blocks (M=40: the last one partial), time segments and loads per segment.
SMALL_TILES = dict(FWD_BM=32, FWD_TS=16, FWD_ROWS=4, BWD_BM=32, BWD_TS=16, BWD_ROWS=8)


@pytest.mark.parametrize(
    "B,L,M,K,window,docs,activation,strided,tiles",
    [
        pytest.param(2, 1, 20, 4, True, False, "silu", False, None, id="L1-decode"),
        pytest.param(2, 3, 20, 4, True, True, "silu", True, None, id="L3-shorter-than-window"),
        pytest.param(1, 63, 24, 3, False, True, None, True, None, id="L63-K3-docs-nowin"),
        pytest.param(2, 63, 24, 3, True, True, "silu", False, None, id="L63-K3-docs-win"),
        pytest.param(2, 63, 20, 1, True, True, "silu", False, None, id="L63-K1-docs"),
        pytest.param(2, 63, 40, 2, True, True, None, True, SMALL_TILES, id="L63-K2-docs-small-tiles"),
        pytest.param(1, 257, 40, 4, True, True, "silu", True, SMALL_TILES, id="L257-K4-docs-win-small-tiles"),
        pytest.param(2, 257, 24, 4, False, False, "silu", False, None, id="L257-K4-plain"),
    ],
)
def test_triton_matches_reference(B, L, M, K, window, docs, activation, strided, tiles, monkeypatch):
    for name, value in (tiles or {}).items():
        monkeypatch.setattr(triton_conv, name, value)
    case, cot = make_case(B, L, M, K, window=window, docs=docs, strided=strided, seed=L * 10 + K)
    check(case, cot, activation, 1e-5, "triton")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float16, 1e-3)], ids=["bf16", "fp16"])
def test_triton_low_precision_within_rounding(dtype, tol):
    case, cot = make_case(2, 45, 24, 4, window=True, docs=True, strided=True, seed=11, dtype=dtype)
    check(case, cot, "silu", tol, "triton")


def test_triton_rejects_float64_and_wide_kernels():
    case, _ = make_case(1, 4, 3, 2, window=False, docs=False, strided=False, seed=1, dtype=torch.float64)
    with pytest.raises(ValueError, match="use backend='torch' for float64"):
        causal_conv1d(case["x"], case["weight"], backend="triton")
    with pytest.raises(ValueError, match="at most 4 taps, got K=5"):
        causal_conv1d(case["x"].float(), torch.randn(3, 5, device=DEVICE), backend="triton")


def test_torch_path_wide_kernel():
    """K > 4 (no Triton kernel): the PyTorch path, also what ``auto`` picks for it."""
    case, cot = make_case(2, 30, 5, 6, window=True, docs=True, strided=True, seed=2, dtype=torch.float64,
                          device="cpu")
    check(case, cot, "silu", 1e-12, "auto")


def test_compiled_triton_matches_eager():
    """fullgraph: a graph break raises; aot_eager runs the fakes and the autograd formula."""
    case, cot = make_case(2, 19, 12, 4, window=True, docs=True, strided=True, seed=5)

    def conv(*args, **kw):
        return causal_conv1d(*args, backend="triton", **kw)

    eager = outputs_and_grads(conv, case, cot, "silu")
    compiled = outputs_and_grads(torch.compile(conv, fullgraph=True, backend="aot_eager"), case, cot, "silu")
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-6, atol=1e-6)


def test_custom_ops_pass_opcheck():
    case, _ = make_case(2, 10, 8, 3, window=True, docs=True, strided=True, seed=6)
    x, w, b, win, pos = (case[k] for k in ("x", "weight", "bias", "window", "position_in_doc"))
    leaves = [t.detach().requires_grad_() for t in (x, w, b, win)]
    torch.library.opcheck(torch.ops.kla_conv.fwd, (*leaves, pos, True))
    torch.library.opcheck(torch.ops.kla_conv.fwd, (leaves[0], leaves[1], None, None, None, False))
    dy = torch.randn(x.shape, device=x.device)
    torch.library.opcheck(torch.ops.kla_conv.bwd, (dy, x, w, b, win, pos, True))
    torch.library.opcheck(torch.ops.kla_conv.bwd, (dy, x, w, None, None, None, False))


# ----------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(x=torch.randn(2, 5)), r"`x` must be a non-empty \[B, L, M\]"),
        (dict(x=torch.randn(2, 0, 4)), r"`x` must be a non-empty"),
        (dict(weight=torch.randn(5, 3)), r"`weight` must have shape \[M, K\] or \[M, 1, K\] with M=4"),
        (dict(weight=torch.randn(4, 2, 3)), r"`weight` must have shape"),
        (dict(bias=torch.randn(3)), r"`bias` must have shape \[4\]"),
        (dict(window=torch.randn(2, 4, 3)), r"`window` must have shape \[2, 4, 2\]"),
        (dict(position_in_doc=torch.arange(4)), r"`position_in_doc` must have shape \[5\]"),
        (dict(position_in_doc=torch.zeros(5)), r"`position_in_doc` must be an integer tensor"),
        (dict(x=torch.randn(2, 5, 4).to(torch.int32)), r"`x` must be bf16, fp16, fp32 or fp64"),
        (dict(activation="relu"), r"`activation` must be one of"),
        (dict(backend="cuda"), r"unknown backend 'cuda'"),
    ],
)
def test_bad_inputs_raise(change, match):
    args = dict(x=torch.randn(2, 5, 4), weight=torch.randn(4, 3), bias=torch.randn(4), window=None,
                position_in_doc=None, activation=None, backend="torch")
    args.update(change)
    x, w, b = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(ValueError, match=match):
        causal_conv1d(x, w, b, **args)


# ----------------------------------------------------------------------------- GPU

GPU_SHAPE = (2, 4096, 4096, 4)  # B, L, M, K


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 5e-3), (torch.float32, 1e-5)], ids=["bf16", "fp32"])
def test_gpu_realistic_size_matches_reference(dtype, tol):
    case, cot = make_case(*GPU_SHAPE, window=True, docs=True, strided=True, seed=21, dtype=dtype, n_docs=8)
    check(case, cot, "silu", tol, "triton")


def _step(case, cot):
    return outputs_and_grads(lambda *a, **kw: causal_conv1d(*a, backend="triton", **kw), case, cot, "silu")


@pytest.mark.gpu
def test_gpu_backward_is_deterministic():
    case, cot = make_case(*GPU_SHAPE, window=True, docs=True, strided=True, seed=22, dtype=torch.bfloat16)
    first, second = _step(case, cot), _step(case, cot)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_replays_forward_and_backward():
    case, cot = make_case(2, 1000, 520, 4, window=True, docs=True, strided=True, seed=23, dtype=torch.bfloat16)
    side = torch.cuda.Stream()  # warm-up (Triton compiles) off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            _step(case, cot)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _step(case, cot)
    fresh, _ = make_case(2, 1000, 520, 4, window=True, docs=True, strided=True, seed=24, dtype=torch.bfloat16)
    with torch.no_grad():
        for k in GRADS:
            case[k].copy_(fresh[k])
    graph.replay()
    torch.cuda.synchronize()
    eager = _step(case, cot)
    for name in eager:
        assert torch.equal(static[name], eager[name]), f"{name} differs after replay"


@pytest.mark.gpu
def test_gpu_inductor_fullgraph_matches_eager():
    case, cot = make_case(2, 1000, 520, 4, window=True, docs=True, strided=True, seed=25, dtype=torch.bfloat16)

    def conv(*args, **kw):
        return causal_conv1d(*args, backend="triton", **kw)

    eager = outputs_and_grads(conv, case, cot, "silu")
    compiled = outputs_and_grads(torch.compile(conv, fullgraph=True), case, cot, "silu")
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-2, atol=1e-2)
