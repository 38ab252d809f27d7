"""The hybrid models' core attention (parallel/cp_attention.py) and the lean KLANorm
(layers/norm.py).

CPU: CoreAttention equals a float64 softmax reference and the previous dense-mask
implementation (outputs and q/k/v gradients) with and without packed documents, MHA / GQA /
MQA, megatron's ``thd`` packing, CP = 2 and CP = 4 on gloo ranks in both shard orders (with
the per-document loop and with the chunk offsets a varlen kernel gets); at CP = 1 no tensor of
s² elements exists in forward + backward (core and whole hybrid model); TE is selected when
importable; dropout follows megatron. KLANorm: fp32 math vs float64, and it keeps only its
input for backward (saved-tensor bytes per token).

GPU (``gpu`` mark): flash kernels are selected (no softmax/score tensor), peak memory of a
B2·S4096·H16 bf16 core forward + backward stays far below the s² score size, and outputs
match the math backend, for CP = 1, packed documents (varlen) and a CP chunk (lower-right
causal).
"""
from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kla_megatron.parallel import cp_attention
from kla_megatron.parallel.sharding import shard, unshard
from tests.dist_utils import run_on_ranks

L = 64
CU = [0, 3, 17, 18, 32, 40, 40, 64]  # crosses CP chunk edges, one edge on a chunk boundary, one empty document
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


# ---------------------------------------------------------------------------- references


def make_inputs(heads, b=2, length=L, seed=0, dtype=torch.float64):
    nh, ng = HEADS[heads]
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    hd = 8
    return r(length, b, nh, hd), r(length, b, ng, hd), r(length, b, ng, hd), r(length, b, nh * hd)


def reference(q, k, v, cu=None, scale=None):
    """float64 softmax attention, causal (+ same document), [s, b, h, d] -> [s, b, h·d]."""
    s = q.shape[0]
    pos = torch.arange(s)
    allowed = pos[None, :] <= pos[:, None]
    if cu is not None:
        doc = torch.searchsorted(torch.tensor(cu), pos, right=True)
        allowed = allowed & (doc[:, None] == doc[None, :])
    k, v = (t.double().repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    qq, kk, vv = (t.double().permute(1, 2, 0, 3) for t in (q, k, v))
    scores = qq @ kk.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1]))
    out = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vv
    return out.permute(2, 0, 1, 3).reshape(s, q.shape[1], -1)


def previous_dense_attention(q, k, v, cu=None):
    """The CPDotProductAttention this module replaced (one process): a dense boolean
    [s, s] mask, K/V repeated for GQA, one SDPA call."""
    s = q.shape[0]
    pos = torch.arange(s)
    mask = pos[None, :] <= pos[:, None]
    if cu is not None:
        doc = torch.searchsorted(torch.tensor(cu), pos, right=True) - 1
        mask = mask & (doc[:, None] == doc[None, :])
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2) for t in (k, v))
    out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=mask)
    return out.permute(2, 0, 1, 3).reshape(s, q.shape[1], -1)


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=None, enable_gqa=False):
    """CPU stand-in for torch's flash ``varlen_attn`` with its documented semantics (each
    query segment attends bottom-right-causally to its key segment), so the offsets that
    documents_block/varlen_block build are checked without CUDA."""
    assert window_size == (-1, 0)
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    assert max_q == max(b - a for a, b in zip(cu_q[:-1], cu_q[1:]))
    assert max_k == max(b - a for a, b in zip(cu_k[:-1], cu_k[1:]))
    assert enable_gqa == (q.shape[1] != k.shape[1])
    outs = []
    for (qa, qb), (ka, kb) in zip(zip(cu_q[:-1], cu_q[1:]), zip(cu_k[:-1], cu_k[1:])):
        assert kb - ka >= qb - qa
        outs.append(cp_attention.causal_block(q[qa:qb, None], k[ka:kb, None], v[ka:kb, None], scale)[:, 0])
    return torch.cat(outs)


def with_fake_varlen(monkeypatch):
    monkeypatch.setattr(cp_attention, "use_varlen", lambda q, dropout: dropout == 0.0)
    monkeypatch.setattr(cp_attention, "varlen_kernel", lambda: (fake_varlen, {"window_size": (-1, 0)}, True))


def config(nh=4, ng=2, cp=1, **kw):
    from megatron.core.transformer import TransformerConfig

    kw = dict(num_layers=1, hidden_size=nh * 8, num_attention_heads=nh, num_query_groups=ng,
              context_parallel_size=cp, attention_dropout=0.0, use_cpu_initialization=True) | kw
    return TransformerConfig(**kw)


def core(heads="gqa", group=None, layout="load_balanced", head_dim=8, **kw):
    from megatron.core.transformer.enums import AttnMaskType

    nh, ng = HEADS[heads]
    cp = 1 if group is None else torch.distributed.get_world_size(group)
    return cp_attention.CoreAttention(config(nh, ng, cp, kv_channels=head_dim, **kw), 1, AttnMaskType.causal, "self",
                                      pg_collection=types.SimpleNamespace(cp=group), cp_layout=layout)


def packing(cu, fmt="sbhd"):
    from megatron.core.packed_seq_params import PackedSeqParams

    t = torch.tensor(cu, dtype=torch.int32)
    return PackedSeqParams(qkv_format=fmt, cu_seqlens_q=t, cu_seqlens_kv=t, max_seqlen_q=L, max_seqlen_kv=L)


def fwd_bwd(fn, q, k, v, go):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    (out * go).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def assert_all_close(got, want, tol, what):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what} [{'out dq dk dv'.split()[i]}]: {m}")


F64 = dict(rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- CP = 1


@pytest.mark.parametrize("heads", list(HEADS))
@pytest.mark.parametrize("docs", ["none", "packed", "packed_varlen_offsets"])
def test_cp1_matches_float64_reference_and_previous_dense_mask(heads, docs, monkeypatch):
    if docs == "packed_varlen_offsets":
        with_fake_varlen(monkeypatch)
    cu = None if docs == "none" else CU
    q, k, v, go = make_inputs(heads)
    m = core(heads)
    got = fwd_bwd(lambda *t: m(*t, None, packed_seq_params=None if cu is None else packing(cu)), q, k, v, go)
    assert_all_close(got, fwd_bwd(lambda *t: reference(*t, cu), q, k, v, go), F64, f"{heads}/{docs} vs float64")
    assert_all_close(got, fwd_bwd(lambda *t: previous_dense_attention(*t, cu), q, k, v, go), F64,
                     f"{heads}/{docs} vs the dense-mask core")


def test_thd_packing_and_caller_mask():
    """megatron's thd packing ([t, h, d] in, [t, h·d] out) and a caller's dense mask (the
    dense path, combined with causal) give the same result as sbhd documents."""
    q, k, v, go = make_inputs("gqa", b=1)
    m = core("gqa")
    want = fwd_bwd(lambda *t: reference(*t, CU), q, k, v, go)
    thd = fwd_bwd(lambda *t: m(*(x[:, 0] for x in t), None, packed_seq_params=packing(CU, "thd"))[:, None],
                  q, k, v, go)
    assert_all_close(thd, want, F64, "thd")
    pos = torch.arange(L)
    doc = torch.searchsorted(torch.tensor(CU), pos, right=True)
    mask = (doc[:, None] != doc[None, :])[None, None]  # True = masked; causal comes from the core
    dense = fwd_bwd(lambda *t: m(*t, mask), q, k, v, go)
    assert_all_close(dense, want, F64, "caller mask")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs(dtype):
    q, k, v, go = make_inputs("gqa", dtype=dtype)
    m = core("gqa")
    for cu in (None, CU):
        out = m(q, k, v, None, packed_seq_params=None if cu is None else packing(cu))
        assert out.dtype == dtype
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(out.double(), reference(q, k, v, cu), **tol)


def _square(shape, s) -> bool:
    """A mask or score block: its last two axes (queries, keys) both >= s."""
    shape = list(shape) if isinstance(shape, (list, tuple, torch.Size)) else []
    return len(shape) >= 2 and all(isinstance(n, int) and n >= s for n in shape[-2:])


class SizeRecorder(TorchDispatchMode):
    """Largest tensor (elements) produced by any aten op, the shapes whose last two axes are
    at least ``s`` (an s×s mask or score block), and the ops seen."""

    def __init__(self, s=None):
        super().__init__()
        self.s, self.largest, self.square, self.ops = s, 0, set(), set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(str(func.overloadpacket))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if self.s is not None and _square(t.shape, self.s):
                    self.square.add((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("docs", [False, True])
def test_no_s_squared_tensor_at_cp1(docs):
    """s = 1024, b = 1, 4 heads: every tensor of forward + backward is far below s² elements
    (the previous core built an s×s mask, megatron's local core s×s scores per head)."""
    s = 1024
    q, k, v, go = make_inputs("gqa", b=1, length=s, dtype=torch.float32)
    m = core("gqa")
    psp = packing([0, 100, 612, s]) if docs else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with SizeRecorder(s) as rec:
        out = m(*leaves, None, packed_seq_params=psp)
        (out * go).sum().backward()
    assert rec.largest < s * s // 4 and not rec.square, (rec.largest, rec.square, sorted(rec.ops))
    assert "aten._softmax" not in rec.ops and "aten.bmm" not in rec.ops, sorted(rec.ops)
    torch.testing.assert_close(out.double(), reference(q, k, v, [0, 100, 612, s] if docs else None),
                               rtol=1e-4, atol=1e-5)


def test_dropout_follows_megatron(monkeypatch):
    """Dropout only in training, from the model-parallel RNG tracker unless sequence parallel."""
    q, k, v, _ = make_inputs("mha", b=1)
    sp = core("mha", attention_dropout=0.5, sequence_parallel=True, tensor_model_parallel_size=2)
    sp.eval()
    torch.testing.assert_close(sp(q, k, v, None), reference(q, k, v), **F64)
    sp.train()
    torch.manual_seed(0)
    a = sp(q, k, v, None)
    torch.manual_seed(0)
    assert torch.equal(a, sp(q, k, v, None))
    assert not torch.allclose(a, reference(q, k, v))

    forks = []

    class Tracker:
        def fork(self):
            forks.append(1)
            return torch.random.fork_rng()

    from megatron.core import tensor_parallel

    monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda: Tracker())
    m = core("mha", attention_dropout=0.5)
    m.train()
    m(q, k, v, None)
    assert forks == [1]
    m.eval()
    m(q, k, v, None)
    assert forks == [1]


def test_unsupported_options_raise():
    from megatron.core.transformer.enums import AttnMaskType

    from megatron.core.packed_seq_params import PackedSeqParams

    q, k, v, _ = make_inputs("gqa", b=1)
    with pytest.raises(ValueError, match="only causal"):
        cp_attention.CoreAttention(config(), 1, AttnMaskType.no_mask, "self", pg_collection=types.SimpleNamespace())
    with pytest.raises(ValueError, match="self-attention"):
        cp_attention.CoreAttention(config(), 1, AttnMaskType.causal, "cross", pg_collection=types.SimpleNamespace())
    with pytest.raises(ValueError, match="sliding-window"):
        core(window_size=(8, 0))
    m = core()
    with pytest.raises(ValueError, match="attention_bias"):
        m(q, k, v, None, attention_bias=torch.zeros(1))
    with pytest.raises(ValueError, match="rise from 0 to the global length"):
        m(q, k, v, None, packed_seq_params=packing([0, 10, 60]))
    padded = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=torch.tensor(CU), cu_seqlens_q_padded=torch.tensor(CU))
    with pytest.raises(ValueError, match="padded documents"):
        m(q, k, v, None, packed_seq_params=padded)


# ---------------------------------------------------------------------------- selection


class FakeTE(torch.nn.Module):
    """Stands in for megatron's TEDotProductAttention (constructor and forward signatures)."""

    calls: list = []

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, k_channels=None, v_channels=None, num_splits=None, cp_comm_type="p2p",
                 pg_collection=None):
        super().__init__()
        self.init_args = dict(cp_comm_type=cp_comm_type, softmax_scale=softmax_scale)

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None,
                packed_seq_params=None, num_splits=None):
        FakeTE.calls.append(None if packed_seq_params is None else packed_seq_params.qkv_format)
        return torch.zeros(query.shape[0], *query.shape[1:-2], query.shape[-2] * query.shape[-1])


def test_selection_picks_te_when_importable(monkeypatch):
    from megatron.core.transformer.enums import AttnMaskType

    args = (config(), 1, AttnMaskType.causal, "self")
    kw = dict(cp_comm_type=None, softmax_scale=None, pg_collection=types.SimpleNamespace(cp=None))
    monkeypatch.delenv(cp_attention.BACKEND_ENV, raising=False)
    if not torch.cuda.is_available():  # the real check: no TE here
        assert cp_attention.te_attention_base() is None
    monkeypatch.setattr(cp_attention, "te_attention_base", lambda: None)
    assert type(cp_attention.cp_core_attention(*args, **kw)) is cp_attention.CoreAttention
    monkeypatch.setenv(cp_attention.BACKEND_ENV, "te")
    with pytest.raises(RuntimeError, match="not importable"):
        cp_attention.cp_core_attention(*args, **kw)

    monkeypatch.setattr(cp_attention, "te_attention_base", lambda: FakeTE)
    for env in ("auto", "te"):
        monkeypatch.setenv(cp_attention.BACKEND_ENV, env)
        m = cp_attention.cp_core_attention(*args, **kw)
        assert isinstance(m, FakeTE) and type(m).__name__ == "TECoreAttention"
        assert isinstance(m.local, cp_attention.CoreAttention) and not list(m.parameters())
    monkeypatch.setenv(cp_attention.BACKEND_ENV, "local")
    assert type(cp_attention.cp_core_attention(*args, **kw)) is cp_attention.CoreAttention
    monkeypatch.setenv(cp_attention.BACKEND_ENV, "flash")
    with pytest.raises(ValueError, match="must be one of"):
        cp_attention.cp_core_attention(*args, **kw)

    # Routing: TE for plain causal and thd; the local core for sbhd documents and caller masks.
    monkeypatch.setenv(cp_attention.BACKEND_ENV, "auto")
    m = cp_attention.cp_core_attention(*args, **kw)
    q, k, v, _ = make_inputs("gqa", b=1)
    FakeTE.calls.clear()
    assert not m(q, k, v, None, attn_mask_type=AttnMaskType.causal).any()
    assert not m(q[:, 0], k[:, 0], v[:, 0], None, attn_mask_type=AttnMaskType.causal,
                 packed_seq_params=packing(CU, "thd")).any()
    assert FakeTE.calls == [None, "thd"]
    out = m(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=cp_attention.attention_packing(
        packing(CU, "thd")))
    torch.testing.assert_close(out, reference(q, k, v, CU), **F64)
    assert FakeTE.calls == [None, "thd"]


def test_varlen_kernel_signature():
    """torch's varlen_attn (2.10: is_causal; 2.11+: window_size) is found and adapted."""
    found = cp_attention.varlen_kernel()
    try:
        from torch.nn.attention import varlen  # noqa: F401
    except ImportError:
        assert found is None
        return
    fn, causal, _ = found
    assert causal in ({"window_size": (-1, 0)}, {"is_causal": True})
    if not torch.cuda.is_available():
        assert not cp_attention.use_varlen(torch.zeros(4, 1, 2, 8, dtype=torch.bfloat16), 0.0)


# ---------------------------------------------------------------------------- CP on gloo ranks


def _cp_body(rank, world):
    """CP = 4 (the world) and CP = 2 (ranks {0,1} and {2,3}) in one spawn: both layouts, MHA
    and GQA, no documents / documents through the loop / documents through varlen offsets."""
    import torch.distributed as dist

    pairs = dist.new_group([0, 1]), dist.new_group([2, 3])  # collective: every rank creates both
    results = {}
    for cp, group in ((4, dist.group.WORLD), (2, pairs[rank // 2])):
        r = dist.get_rank(group)
        for layout in ("contiguous", "load_balanced"):
            for heads in ("mha", "gqa"):
                q, k, v, go = make_inputs(heads)
                local = [shard(t, r, cp, layout, seq_dim=0) for t in (q, k, v, go)]
                m = core(heads, group, layout)
                for docs in ("none", "packed", "packed_varlen_offsets"):
                    patch = pytest.MonkeyPatch()
                    if docs == "packed_varlen_offsets":
                        with_fake_varlen(patch)
                    try:
                        psp = None if docs == "none" else packing(CU)
                        results[cp, layout, heads, docs] = fwd_bwd(lambda *t: m(*t, None, packed_seq_params=psp),
                                                                   *local)
                    finally:
                        patch.undo()
        # A caller's global mask goes through the dense path under CP too.
        q, k, v, go = make_inputs("gqa")
        mask = torch.zeros(1, 1, L, L, dtype=torch.bool)
        mask[..., 5] = True  # nobody attends to key 5
        local = [shard(t, r, cp, "load_balanced", seq_dim=0) for t in (q, k, v, go)]
        results[cp, "mask"] = fwd_bwd(lambda *t: core("gqa", group)(*t, mask), *local)
        try:
            core("gqa", group)(*(t[:, 0] for t in local[:3]), None, packed_seq_params=packing(CU, "thd"))
            results[cp, "thd"] = "no error"
        except ValueError as exc:
            results[cp, "thd"] = str(exc)
    if rank == 0:
        results["model"] = _model_sizes()
    return results


def _model_sizes():
    """Largest tensor in forward + backward of a tiny hybrid model at s = 1024 (CP = 1)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kla_megatron.compat import enable_cpu_megatron
    from tests import test_model_helpers as h

    enable_cpu_megatron()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    model_parallel_cuda_manual_seed(1)
    s = 1024
    model = h.build(h.tiny_config("K*-", "plain", max_seq_len=s), dtype=torch.float32)
    tokens = torch.randint(0, h.V, (1, s), generator=torch.Generator().manual_seed(0))
    out = {}
    for docs in (False, True):
        psp = packing([0, 300, 301, s]) if docs else None
        with SizeRecorder(s) as rec:
            model(tokens, None, None, labels=tokens, packed_seq_params=psp).sum().backward()
        out[docs] = (s, rec.square, sorted(rec.ops))
    return out


def _init_model_parallel_everywhere(rank, world):
    from megatron.core import parallel_state

    from kla_megatron.compat import enable_cpu_megatron

    enable_cpu_megatron()
    parallel_state.initialize_model_parallel()  # collective: every rank
    return _cp_body(rank, world)


@pytest.fixture(scope="module")
def cp_runs():
    return run_on_ranks(_init_model_parallel_everywhere, world_size=4)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("layout", ["contiguous", "load_balanced"])
def test_cp_matches_float64_reference_and_previous_dense_mask(cp_runs, cp, layout):
    ranks = cp_runs[:cp]
    for heads in ("mha", "gqa"):
        q, k, v, go = make_inputs(heads)
        for docs in ("none", "packed", "packed_varlen_offsets"):
            cu = None if docs == "none" else CU
            got = [unshard([r[cp, layout, heads, docs][i] for r in ranks], layout, seq_dim=0) for i in range(4)]
            what = f"CP={cp} {layout} {heads} {docs}"
            assert_all_close(got, fwd_bwd(lambda *t: reference(*t, cu), q, k, v, go), F64, what + " vs float64")
            assert_all_close(got, fwd_bwd(lambda *t: previous_dense_attention(*t, cu), q, k, v, go), F64,
                             what + " vs the dense-mask core")
    # the second CP=2 group (ranks 2, 3) computed the same
    if cp == 2:
        for key in cp_runs[2]:
            if key[0] == 2 and key[1] == layout:
                for a, b in zip(cp_runs[2][key], cp_runs[0][key]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_caller_mask_and_thd_error(cp_runs, cp):
    q, k, v, go = make_inputs("gqa")
    got = [unshard([r[cp, "mask"][i] for r in cp_runs[:cp]], "load_balanced", seq_dim=0) for i in range(4)]

    def masked_reference(q, k, v):
        s = q.shape[0]
        pos = torch.arange(s)
        allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] != 5)
        kk, vv = (t.repeat_interleave(2, dim=2).permute(1, 2, 0, 3) for t in (k, v))
        scores = q.permute(1, 2, 0, 3) @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num()  # query 5 sees nothing
        return (probs @ vv).permute(2, 0, 1, 3).reshape(s, q.shape[1], -1)

    want = fwd_bwd(masked_reference, q, k, v, go)
    keep = torch.arange(L) != 5  # SDPA's fully masked row is NaN; compare the others
    assert_all_close([got[0][keep]] + got[1:], [want[0][keep]] + want[1:], F64, f"CP={cp} caller mask")
    assert "thd" in cp_runs[0][cp, "thd"]


@pytest.mark.parametrize("docs", [False, True])
def test_hybrid_model_has_no_s_squared_tensor(cp_runs, docs):
    from kla_megatron.models import kla_model

    if docs and hasattr(kla_model, "_document_causal_mask"):
        pytest.skip("KLAModel still hands '*' layers a dense [s, s] document mask instead of "
                    "attention_packing(packed_seq_params)")
    s, square, ops = cp_runs[0]["model"][docs]
    assert not square, square  # (the KLA scan's own tensors are linear in s, with a large per-token factor)
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops, ops


# ---------------------------------------------------------------------------- KLANorm


def norm(kind, dtype=torch.float32, hidden=16, sp=True):
    from kla_megatron.layers import KLANorm

    cfg = config(normalization=kind, params_dtype=dtype, sequence_parallel=sp, tensor_model_parallel_size=2)
    n = KLANorm(cfg, hidden)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in n.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1)
    return n


def norm_reference(kind, x, weight, bias, eps=1e-5):
    x, weight = x.double(), weight.double()
    if kind == "RMSNorm":
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * weight
    mu = x.mean(-1, keepdim=True)
    return (x - mu) * torch.rsqrt((x - mu).square().mean(-1, keepdim=True) + eps) * weight + bias.double()


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_norm_matches_float64(kind, dtype):
    n = norm(kind, torch.float32 if dtype == torch.bfloat16 else dtype)
    assert all(p.sequence_parallel and p.no_weight_decay for p in n.parameters())
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 3, 16, generator=g, dtype=torch.float64) * 3 + 1).to(dtype).requires_grad_()
    gy = torch.randn(6, 3, 16, generator=g, dtype=torch.float64).to(dtype)
    y = n(x)
    assert y.dtype == dtype
    (y.double() * gy.double()).sum().backward()
    xr = x.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in (n.weight, n.bias) if p is not None]
    yr = norm_reference(kind, xr, *params, None) if kind == "RMSNorm" else norm_reference(kind, xr, *params)
    (yr * gy.double()).sum().backward()
    tol = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=1e-2, atol=2e-2)}[dtype]
    # bf16: output rounded once from the fp32 result; gradients in fp32 then rounded.
    torch.testing.assert_close(y.double(), yr, **tol)
    torch.testing.assert_close(x.grad.double(), xr.grad, **tol)
    for p, pr in zip([p for p in (n.weight, n.bias) if p is not None], params):
        torch.testing.assert_close(p.grad.double(), pr.grad, **(tol if dtype != torch.bfloat16 else
                                                               dict(rtol=1e-4, atol=1e-4)))


def test_norm_bf16_output_is_the_rounded_fp32_result():
    n = norm("RMSNorm")
    x = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(5)).bfloat16()
    want = norm_reference("RMSNorm", x.float(), n.weight.float(), None).float().bfloat16()
    assert torch.equal(n(x), want)


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_norm_saves_only_its_input(kind):
    """Bytes kept for backward per token, bf16 input at D = 512: the input (2·D) and no fp32
    copies (the previous norm kept ≈ 6 fp32 copies: ≈ 24·D bytes)."""
    hidden = 512
    n = norm(kind, hidden=hidden)

    def saved_bytes(tokens):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        x = torch.randn(tokens, 1, hidden).bfloat16().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = n(x)
        y.float().sum().backward()
        return sum(total)

    per_token = (saved_bytes(256) - saved_bytes(128)) / 128
    assert per_token <= 2 * hidden + 16, per_token


def test_norm_under_autocast_keeps_input_dtype():
    n = norm("RMSNorm")
    x = torch.randn(4, 2, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = n(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    torch.testing.assert_close(y.double(), norm_reference("RMSNorm", x.detach(), n.weight.detach(), None),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- GPU


def profiled_ops(fn, s):
    """Run ``fn`` under torch.profiler: (aten op names, input shapes whose last two axes are >= s).
    (A TorchDispatchMode can't be used here: torch's CausalBias can't be created under one.)"""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        result = fn()
    names, square = set(), set()
    for event in prof.events():
        names.add(event.name)
        for shape in event.input_shapes or []:
            if _square(shape, s):
                square.add((event.name, tuple(shape)))
    return result, names, square


FLASH_OPS = {"aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_cudnn_attention",
             "aten::_flash_attention_forward", "aten::_scaled_dot_product_efficient_attention",
             "aten::_efficient_attention_forward", "torch_attn::_varlen_attn"}


def _gpu_inputs(s=4096, b=2, nh=16, ng=16, d=128, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    return r(s, b, nh, d), r(s, b, ng, d), r(s, b, ng, d), r(s, b, nh * d)


def _math_reference(q, k, v, cu=None):
    """fp32 SDPA math backend on the same (bf16-representable) values, causal (+ documents)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = q.shape[0]
    pos = torch.arange(s, device=q.device)
    allowed = pos[None, :] <= pos[:, None]
    if cu is not None:
        doc = torch.searchsorted(torch.tensor(cu, device=q.device), pos, right=True)
        allowed = allowed & (doc[:, None] == doc[None, :])
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(*(t.float().permute(1, 2, 0, 3) for t in (q, k, v)),
                                             attn_mask=allowed, enable_gqa=q.shape[2] != k.shape[2])
    return out.permute(2, 0, 1, 3).reshape(s, q.shape[1], -1)


GPU_CASES = {"causal": None, "documents": [0, 1000, 1001, 2900, 4096]}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_peak_memory_far_below_scores(case):
    """s = 4096, 16 heads, d = 128, bf16, b = 2 (b = 1 with documents: megatron packs one
    sequence per micro-batch): forward + backward of the core, beyond its inputs, output and
    gradients, needs < 25 % of the s² scores' b·h·s²·2 bytes (math attention needs > 100 %)."""
    cu = GPU_CASES[case]
    b = 2 if cu is None else 1
    q, k, v, go = _gpu_inputs(b=b)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    m = core("mha", head_dim=128)
    psp = None if cu is None else packing(cu)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = m(*leaves, None, packed_seq_params=psp)
    grads = torch.autograd.grad(out, leaves, go)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    io = sum(t.numel() * t.element_size() for t in (out, *grads))
    score_bytes = b * 16 * 4096 * 4096 * 2
    print(f"{case}: peak {peak / 2**20:.1f} MiB over the inputs ({io / 2**20:.1f} MiB output + gradients); "
          f"the scores would take {score_bytes / 2**20:.0f} MiB")
    assert peak - io < 0.25 * score_bytes, (peak, io, score_bytes)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("heads", [(16, 16), (16, 4)])
def test_gpu_flash_selected_and_matches_math(case, heads):
    """Flash kernels are dispatched (no softmax, no [.., s, s] op input) and outputs and
    gradients match the fp32 math backend."""
    cu = GPU_CASES[case]
    s = 4096
    q, k, v, go = _gpu_inputs(s=s, b=1, nh=heads[0], ng=heads[1])
    m = core("mha", head_dim=128)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def run():
        out = m(*leaves, None, packed_seq_params=None if cu is None else packing(cu))
        return out, torch.autograd.grad(out, leaves, go)

    (out, grads), ops, square = profiled_ops(run, s)
    assert not square and "aten::_softmax" not in ops, (square, sorted(ops))
    assert FLASH_OPS & ops, sorted(ops)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]  # fp32 leaves: fp32 gradients
    ref = _math_reference(*ref_leaves, cu)
    ref_grads = torch.autograd.grad(ref, ref_leaves, go.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("docs", [False, True])
def test_gpu_cp_chunk_is_flash_lower_right(docs):
    """A CP rank's late chunk: queries [3072, 4096) against the gathered prefix, via flash's
    bottom-right causal (or varlen with chunk offsets), equals the math backend's rows."""
    s, start, n = 4096, 3072, 1024
    cu = [0, 1000, 3500, 4096] if docs else None
    q, k, v, go = _gpu_inputs(s=s, b=1, nh=16, ng=4)
    qi = q[start : start + n].clone().requires_grad_()
    kk, vv = (t.clone().requires_grad_() for t in (k, v))
    scale = 1 / math.sqrt(q.shape[-1])

    def run():
        if docs:
            out = cp_attention.documents_block(qi, kk, vv, start, cu, scale, 0.0)
        else:
            out = cp_attention.causal_block(qi, kk[: start + n], vv[: start + n], scale)
        out = out.reshape(n, 1, -1)
        return out, torch.autograd.grad(out, [qi, kk, vv], go[start : start + n])

    # a materialised [n, s] lower-right mask or [.., n, s] score block would be caught
    (out, grads), ops, square = profiled_ops(run, n)
    assert not square and "aten::_softmax" not in ops, (square, sorted(ops))
    assert FLASH_OPS & ops, sorted(ops)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]  # fp32 leaves: fp32 gradients
    ref = _math_reference(*ref_leaves, cu)[start : start + n]
    ref_grads = torch.autograd.grad(ref, ref_leaves, go[start : start + n].float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[0].float(), ref_grads[0][start : start + n], rtol=5e-2, atol=5e-2)
    for g, r in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(g.float(), r, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_gpu_norm_matches_float64_and_keeps_only_its_input(kind):
    """KLANorm on CUDA (fused F.rms_norm / F.layer_norm in fp32), bf16 activations, fp32 weights."""
    n = norm(kind, hidden=2048).cuda()
    g = torch.Generator(device="cuda").manual_seed(6)
    x = torch.randn(4096, 2, 2048, generator=g, device="cuda").bfloat16().requires_grad_()
    gy = torch.randn(4096, 2, 2048, generator=g, device="cuda").bfloat16()
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = n(x)
    (y.float() * gy.float()).sum().backward()
    params = [p.detach().double() for p in (n.weight, n.bias) if p is not None]
    xr = x.detach().double().requires_grad_()
    wr = [p.requires_grad_() for p in params]
    yr = norm_reference(kind, xr, wr[0], wr[1] if len(wr) > 1 else None)
    (yr * gy.double()).sum().backward()
    torch.testing.assert_close(y.double(), yr, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(n.weight.grad.double(), wr[0].grad, rtol=1e-3, atol=1e-2)
    assert sum(saved) <= x.numel() * 2 + 2 * 2048 * 4 * 2, saved  # the bf16 input (+ weight, bias)
