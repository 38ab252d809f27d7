"""Sequence sharding for context parallelism (parallel/sharding.py): the load-balanced order is
megatron's (chunks r and 2·CP−1−r), shard/unshard round-trip, the data path's get_cp_shard."""
import pytest
import torch

from kla_megatron.parallel.sharding import chunk_ids, get_cp_shard, shard, unshard


def megatron_order(val, cp_rank, cp_size, seq_dim):
    """megatron.training.utils.get_batch_on_this_cp_rank's slicing, written out."""
    val = val.view(*val.shape[:seq_dim], 2 * cp_size, val.shape[seq_dim] // (2 * cp_size), *val.shape[seq_dim + 1 :])
    val = val.index_select(seq_dim, torch.tensor([cp_rank, 2 * cp_size - cp_rank - 1]))
    return val.view(*val.shape[:seq_dim], -1, *val.shape[seq_dim + 2 :])


@pytest.mark.parametrize("cp", [2, 4])
def test_load_balanced_is_megatron_order(cp):
    x = torch.arange(2 * 32).view(2, 32)
    for r in range(cp):
        assert torch.equal(shard(x, r, cp, "load_balanced"), megatron_order(x, r, cp, 1))
    assert chunk_ids(1, 4, "load_balanced") == [1, 6]
    assert chunk_ids(1, 4, "contiguous") == [1]


@pytest.mark.parametrize("layout", ["contiguous", "load_balanced"])
def test_shard_unshard_round_trip(layout):
    x = torch.randn(3, 24, 5)
    assert torch.equal(unshard([shard(x, r, 3, layout) for r in range(3)], layout), x)


def test_get_cp_shard_batch():
    s, cp = 16, 2
    batch = dict(tokens=torch.arange(s)[None], labels=torch.arange(s)[None] + 100, loss_mask=torch.ones(1, s),
                 position_ids=torch.arange(s)[None], attention_mask=torch.ones(1, 1, s, s, dtype=torch.bool),
                 cu_seqlens=torch.tensor([0, 5, 16]), extra=None)
    out = get_cp_shard(batch, 1, cp, "load_balanced")
    assert out["tokens"].tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert out["labels"].tolist() == [[104, 105, 106, 107, 108, 109, 110, 111]]
    assert out["attention_mask"].shape == (1, 1, 8, 16)
    assert out["cu_seqlens"] is batch["cu_seqlens"] and out["extra"] is None
    assert get_cp_shard(batch, 0, 1)["tokens"] is batch["tokens"]


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="divisible by 4 chunks"):
        shard(torch.zeros(1, 10), 0, 2, "load_balanced")
    with pytest.raises(ValueError, match="layout"):
        shard(torch.zeros(1, 8), 0, 2, "zigzag")
    with pytest.raises(ValueError, match="cp_rank"):
        chunk_ids(2, 2, "contiguous")
