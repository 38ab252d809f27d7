"""Whole models under context parallelism (CP=2, TP=2×CP=2, and PP=2×CP=2 through megatron's
pipeline schedule) equal the single-process model in the loss and every parameter gradient:
pure KLA, packed documents crossing shard boundaries, and hybrid KLA + attention (TE-free CP
attention core, rope + GQA).
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
# Through megatron's pipeline schedule (2 micro-batches, mean loss): reference and PP=2×CP=2.
SCHED_LAYOUTS = {"sched_single": (1, 1), "pp2_cp2": (2, 2)}


def _setup(tp, cp, pp=1):
    from kla_megatron.api import init_parallel

    init_parallel(tp, pp, cp=cp, seed=1)


def _batch(seed=3):
    gen = torch.Generator().manual_seed(seed)
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
    for layout, (pp, cp) in SCHED_LAYOUTS.items():
        _setup(1, cp, pp)
        cp_rank = parallel_state.get_context_parallel_rank()
        data = [get_cp_shard(_batch(seed), cp_rank, cp, "load_balanced") for seed in (3, 4)]
        for key, (pattern, preset, extra, packed) in PATTERNS.items():
            if packed:
                continue
            cfg = h.tiny_config(pattern, preset, max_seq_len=SEQ, **extra)
            model = h.build(cfg, 1, pp, False, context_parallel_size=cp).to(device)
            h.det_init(model)
            # megatron's schedule takes the global seq_length and divides it by CP for p2p shapes.
            helpers_seq, h.SEQ = h.SEQ, SEQ
            try:
                loss = h.run_schedule(model, [{k: v.to(device) for k, v in b.items()} for b in data])
            finally:
                h.SEQ = helpers_seq
            # DDP averages over the dp_cp group (1/CP); megatron's schedule also multiplies a
            # 2-tuple loss by CP in place (it expects local_sum / global_count, while
            # h.run_schedule's loss is the local mean): hence 1/CP² on the summed values.
            group = parallel_state.get_context_parallel_group()
            for param in model.parameters():
                torch.distributed.all_reduce(param.grad, group=group)
                param.grad /= cp * cp
            if loss is not None:
                loss_t = torch.tensor(loss, dtype=torch.float64)
                torch.distributed.all_reduce(loss_t, group=group)
                loss = loss_t.item() / (cp * cp)
            out[layout, key] = dict(loss=loss, **h.local_grads(model))
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


@pytest.mark.parametrize("key", [k for k, v in PATTERNS.items() if not v[3]])
def test_pp_cp_model_matches_single_process(results, key):
    """PP=2×CP=2 through megatron's pipeline schedule (local seq_length) equals one process."""
    reference = [r["sched_single", key] for r in results]
    ranks = [r["pp2_cp2", key] for r in results]
    losses = [r["loss"] for r in ranks if r["loss"] is not None]
    assert len(losses) == 2  # the last stage's two CP ranks
    for loss in losses:
        assert loss == pytest.approx(reference[0]["loss"], rel=1e-6, abs=0)
    ref_grads, grads = h.assemble(reference), h.assemble(ranks)
    assert sorted(grads) == sorted(ref_grads), "parameter sets differ"
    for name, grad in ref_grads.items():
        scale = grad.abs().max().clamp_min(1e-12)
        torch.testing.assert_close(grads[name] / scale, grad / scale, rtol=1e-5, atol=2e-6, msg=f"pp2_cp2/{key}: {name}")
