"""Packed-document boundaries on hand-built batches: ``document_cu_seqlens`` (a document ends
after each EOD and at every row end, never with an empty document), ``packed_seq_params``, and
what each rank of CP=2 holds under the model's load-balanced layout (its tokens and each token's
position inside its document), against expectations written out by hand."""
import pytest
import torch

from kla_megatron.parallel import MODEL_CP_LAYOUT, get_cp_shard
from kla_megatron.parallel.kla_context_parallel import KLAContextParallel
from kla_megatron.training.data import document_cu_seqlens, packed_seq_params

E = 1  # the EOD id in these batches; other ids are ≥ 10


@pytest.mark.parametrize(
    "rows, cu",
    [
        pytest.param([[E, 10, 11, 12]], [0, 1, 4], id="eod-first"),
        pytest.param([[10, 11, 12, E]], [0, 4], id="eod-last"),
        pytest.param([[10, E, E, 11]], [0, 2, 3, 4], id="eod-doubled"),
        pytest.param([[10, 11, 12, 13]], [0, 4], id="eod-absent"),
        pytest.param([[E, E, E]], [0, 1, 2, 3], id="only-eods"),
        pytest.param([[10, E], [E, 11]], [0, 2, 3, 4], id="rows-eod-last-then-first"),
        pytest.param([[10, 11, 12], [13, 14, 15]], [0, 3, 6], id="rows-no-eod"),
        pytest.param([[10, E, 11, E, 12, 13]], [0, 2, 4, 6], id="two-eods-inside"),
    ],
)
def test_document_cu_seqlens(rows, cu):
    got = document_cu_seqlens(torch.tensor(rows), E)
    assert got.dtype == torch.int32 and got.tolist() == cu


def test_packed_seq_params_flatten_rows_and_longest_document():
    params = packed_seq_params(torch.tensor([[10, E, 11, 12], [E, 13, 14, 15]]), E)
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 2, 4, 5, 8]
    assert params.max_seqlen_q == params.max_seqlen_kv == 3


# CP=2, load-balanced: the flattened row is cut into 2·CP = 4 chunks; rank 0 holds chunks 0 and
# 3, rank 1 chunks 1 and 2. Each entry: (tokens, position of each inside its document).
CP2 = {
    "one-row": ([[10, 11, E, 12, 13, E, 14, 15]],
                # documents [10 11 E] [12 13 E] [14 15]; positions 0 1 2 | 0 1 2 | 0 1
                {0: ([10, 11, 14, 15], [0, 1, 0, 1]), 1: ([E, 12, 13, E], [2, 0, 1, 2])}),
    "two-rows": ([[10, E, 11, 12], [E, 13, 14, E]],
                 # flattened 10 E | 11 12 | E | 13 14 E: documents end at 2, 4 (row end), 5, 8
                 {0: ([10, E, 14, E], [0, 1, 1, 2]), 1: ([11, 12, E, 13], [0, 1, 0, 0])}),
}


@pytest.mark.parametrize("case", list(CP2))
def test_cp2_ranks_hold_their_tokens_and_document_positions(case):
    rows, want = CP2[case]
    tokens = torch.tensor(rows)
    params = packed_seq_params(tokens, E)  # as the engine does: from the full batch, before sharding
    flat = tokens.reshape(1, -1)
    for rank, (want_tokens, want_pos) in want.items():
        local = get_cp_shard(dict(tokens=flat), rank, 2, MODEL_CP_LAYOUT)["tokens"]
        # the mixer's own CP helper, given this rank's place in a CP group of 2
        cu, pos = KLAContextParallel(_Group(rank, 2)).packing(params, 1, local.shape[1], "cpu")
        assert cu.tolist() == params.cu_seqlens_q.tolist()  # offsets stay global on every rank
        assert local[0].tolist() == want_tokens, rank
        assert pos.tolist() == want_pos, rank


class _Group:
    """What KLAContextParallel reads of a process group."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size
