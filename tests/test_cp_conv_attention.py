"""Causal-conv halo and the TE-free CP attention core on 4 gloo ranks equal the unsharded ops
(outputs and input gradients), in both shard orders, with packed documents. The rank body runs
inside test_cp_scan's 4-rank spawn (process start-up dominates the cost)."""
import math

import torch
import torch.distributed as dist

from kla_megatron.parallel.conv_halo import cp_causal_conv, cp_position_in_doc
from kla_megatron.parallel.sharding import shard, unshard
from tests.test_cp_scan import cp_results

K = 4
CU = [0, 3, 17, 18, 40, 64]


def conv_fn(weight):
    """Depthwise causal conv with the KLAMixer.causal_conv contract."""

    def run(x, window, position_in_doc):
        b, s, M = x.shape
        if window is None:
            window = x.new_zeros(b, M, K - 1)
        padded = torch.cat([window.transpose(1, 2), x], dim=1)
        y = torch.zeros_like(x)
        for lag in range(K):
            tap = padded[:, K - 1 - lag : K - 1 - lag + s] * weight[:, K - 1 - lag]
            if position_in_doc is not None and lag > 0:
                tap = tap * (position_in_doc >= lag).to(x.dtype)[None, :, None]
            y = y + tap
        return y, padded[:, -(K - 1):].transpose(1, 2)

    return run


def conv_inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 64, 5, generator=g, dtype=torch.float64),
            torch.randn(5, K, generator=g, dtype=torch.float64),
            torch.randn(2, 64, 5, generator=g, dtype=torch.float64))


def attn_inputs():
    g = torch.Generator().manual_seed(1)
    L, b, nh, ng, hd = 64, 1, 4, 2, 8
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return r(L, b, nh, hd), r(L, b, ng, hd), r(L, b, ng, hd), r(L, b, nh * hd)


def attention_reference(q, k, v, cu):
    L = q.shape[0]
    pos = torch.arange(L)
    mask = pos[None, :] <= pos[:, None]
    if cu is not None:
        doc = torch.searchsorted(torch.tensor(cu), pos, right=True) - 1
        mask = mask & (doc[:, None] == doc[None, :])
    k, v = (t.repeat_interleave(q.shape[2] // t.shape[2], dim=2) for t in (k, v))
    qq, kk, vv = (t.permute(1, 2, 0, 3) for t in (q, k, v))
    scores = qq @ kk.transpose(-1, -2) / math.sqrt(q.shape[-1])
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ vv
    return out.permute(2, 0, 1, 3).reshape(L, q.shape[1], -1)


def body(rank, world):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from kla_megatron.parallel.cp_attention import CoreAttention

    group = dist.group.WORLD
    results = {}
    x, w, gy = conv_inputs()
    for layout in ("contiguous", "load_balanced"):
        for packed in (False, True):
            xs = shard(x, rank, world, layout).requires_grad_()
            pos = cp_position_in_doc(torch.tensor(CU), rank, world, layout) if packed else None
            y = cp_causal_conv(conv_fn(w), xs, kernel_size=K, cp_group=group, layout=layout, position_in_doc=pos)
            (y * shard(gy, rank, world, layout)).sum().backward()
            results[("conv", layout, packed)] = (y.detach(), xs.grad)

    parallel_state.initialize_model_parallel(context_parallel_size=world)
    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                            context_parallel_size=world, attention_dropout=0.0, use_cpu_initialization=True)
    q, k, v, go = attn_inputs()
    for layout in ("contiguous", "load_balanced"):
        core = CoreAttention(cfg, 1, AttnMaskType.causal, "self", cp_layout=layout)
        for packed in (False, True):
            psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=torch.tensor(CU, dtype=torch.int32),
                                  cu_seqlens_kv=torch.tensor(CU, dtype=torch.int32)) if packed else None
            qs, ks, vs = (shard(t, rank, world, layout, seq_dim=0).requires_grad_() for t in (q, k, v))
            out = core(qs, ks, vs, None, packed_seq_params=psp)
            (out * shard(go, rank, world, layout, seq_dim=0)).sum().backward()
            results[("attn", layout, packed)] = (out.detach(), qs.grad, ks.grad, vs.grad)
    return results


def test_conv_halo_and_cp_attention_match_unsharded():
    per_rank = [r["conv_attention"] for r in cp_results(4)]
    x, w, gy = conv_inputs()
    q, k, v, go = attn_inputs()
    for layout in ("contiguous", "load_balanced"):
        for packed in (False, True):
            xr = x.clone().requires_grad_()
            pos = None
            if packed:
                cu = torch.tensor(CU)
                ar = torch.arange(64)
                pos = ar - cu[torch.searchsorted(cu, ar, right=True) - 1]
            y, _ = conv_fn(w)(xr, None, pos)
            (y * gy).sum().backward()
            got_y = unshard([r[("conv", layout, packed)][0] for r in per_rank], layout)
            got_g = unshard([r[("conv", layout, packed)][1] for r in per_rank], layout)
            torch.testing.assert_close(got_y, y.detach(), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(got_g, xr.grad, rtol=1e-12, atol=1e-12)

            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            out = attention_reference(*leaves, CU if packed else None)
            (out * go).sum().backward()
            got = per_rank[0][("attn", layout, packed)]
            for i, want in enumerate([out.detach()] + [t.grad for t in leaves]):
                got_i = unshard([r[("attn", layout, packed)][i] for r in per_rank], layout, seq_dim=0)
                torch.testing.assert_close(got_i, want, rtol=1e-10, atol=1e-10, msg=lambda m: f"attn {layout} {packed} {i}: {m}")
