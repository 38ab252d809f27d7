"""Whole models under context parallelism (CP=2, and TP=2×CP=2) equal the single-process model
in the summed per-token loss and every parameter gradient: pure KLA, packed documents
crossing shard boundaries, and hybrid KLA + attention (TE-free CP attention core, rope + GQA).
CPU/gloo, float64, torch scan backend, megatron's load-balanced shard order."""
import pytest
import torch

from tests import test_model_helpers as h
from tests.dist_utils import run_on_ranks

SEQ = 16  # divisible by 2·CP for CP = 2
CU = [0, 3, 10, 11, 16]  # documents crossing the 4 load-balanced chunks of CP = 2
PATTERNS = {
    "kla": ("K-K-", "plain", {}, False),
    "kla_packed": ("KK-", "mamba", {}, True),
    "hybrid": ("K*K-", "mamba", {}, False),
    "hybrid_rope_gqa_packed": ("*K-K", "plain", dict(position_embedding="rope", num_query_groups=2), True),
}
LAYOUTS = {"single": (1, 1), "cp2": (1, 2), "tp2_cp2": (2, 2)}


def _setup(tp, cp):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from kla_megatron.compat import enable_cpu_megatron

    enable_cpu_megatron()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1)


def _batch():
    gen = torch.Generator().manual_seed(3)
    return dict(tokens=torch.randint(0, h.V, (1, SEQ), generator=gen),
                labels=torch.randint(0, h.V, (1, SEQ), generator=gen))


def _body(rank, world_size, device="cpu"):
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams

    from kla_megatron.parallel import get_cp_shard

    out = {}
    for layout, (tp, cp) in LAYOUTS.items():
        _setup(tp, cp)
        cp_rank = parallel_state.get_context_parallel_rank()
        batch = get_cp_shard(_batch(), cp_rank, cp, "load_balanced")
        for key, (pattern, preset, extra, packed) in PATTERNS.items():
            cfg = h.tiny_config(pattern, preset, max_seq_len=SEQ, **extra)
            model = h.build(cfg, tp, 1, False, context_parallel_size=cp).to(device)
            h.det_init(model)
            psp = None
            if packed:
                cu = torch.tensor(CU, dtype=torch.int32, device=device)
                psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                      max_seqlen_q=SEQ, max_seqlen_kv=SEQ)
            model.zero_grad(set_to_none=True)
            tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
            loss = model(tokens, None, None, labels=labels, packed_seq_params=psp).sum()
            loss.backward()
            # The DP+CP gradient reduction (what megatron's DDP does over the dp_cp group).
            loss = loss.detach().clone()
            torch.distributed.all_reduce(loss, group=parallel_state.get_context_parallel_group())
            for param in model.parameters():
                torch.distributed.all_reduce(param.grad, group=parallel_state.get_context_parallel_group())
            out[layout, key] = dict(loss=loss.item(), **h.local_grads(model))
    return out


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(_body, world_size=4)


@pytest.mark.parametrize("key", list(PATTERNS))
@pytest.mark.parametrize("layout", ["cp2", "tp2_cp2"])
def test_cp_model_matches_single_process(results, layout, key):
    reference = [r["single", key] for r in results]
    ranks = [r[layout, key] for r in results]
    for r in ranks:
        assert r["loss"] == pytest.approx(reference[0]["loss"], rel=1e-6, abs=0)
    ref_grads, grads = h.assemble(reference), h.assemble(ranks)
    assert sorted(grads) == sorted(ref_grads), "parameter sets differ"
    for name, grad in ref_grads.items():
        # megatron's vocab-parallel cross-entropy is fp32: compare at fp32 round-off of the largest entry.
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=1e-5, atol=2e-6, msg=f"{layout}/{key}: {name}")
