"""training/data.py below the trainer: the tokenizer check, the mock datasets' sizes and EOD id,
which global samples each data-parallel rank's micro-batches hold, and the model inputs of a
packed and an unpacked micro-batch, against values written out by hand. Written against
bench/mutation.sh's surviving mutants (the trainer runs in tests/test_train.py reach the same
code, too slowly to run once per mutant)."""
import os
from types import SimpleNamespace

import pytest
import torch

from kla_megatron.training import data, tokenizer
from kla_megatron.training.config import load_run_config

VOCAB = 64


def _run(*overrides):
    raw = {"model": "kla_tiny", "train": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 4,
                                          "seq_length": 16}}
    return load_run_config(raw=raw, overrides=list(overrides))


def test_mock_datasets_cover_every_step_and_eod_is_the_last_id():
    ds = data.build_datasets(_run("train.eval_interval=0"), VOCAB)
    assert ds.valid is None and ds.eod_id == VOCAB - 1
    assert len(ds.train) >= 3 * 4
    sample = ds.train[11]
    assert sample["tokens"].shape == (16,) and int(sample["tokens"].max()) < VOCAB
    with_valid = data.build_datasets(_run("train.eval_interval=1", "train.eval_iters=2"), VOCAB)
    assert with_valid.valid is not None and len(with_valid.valid) >= 2 * 4


def test_indexed_tokenizer_must_fit_the_model_vocabulary(monkeypatch):
    run = _run("data.kind=indexed", "data.blend=[x_text_document]", "data.tokenizer=tok.model")
    monkeypatch.setattr(tokenizer, "load_tokenizer", lambda path: SimpleNamespace(vocab_size=VOCAB, path=path))
    assert data._tokenizer(run, VOCAB).path == "tok.model"  # exactly the model's vocab fits
    with pytest.raises(ValueError, match="tok.model has 64 tokens but the model's vocab_size is 63"):
        data._tokenizer(run, VOCAB - 1)


class _Samples:
    def __getitem__(self, i):
        return {"tokens": [i, i], "labels": [i + 100], "loss_mask": [i % 2]}


@pytest.mark.parametrize("dp_rank, micro_batches", [(0, [[16, 17], [18, 19]]), (1, [[20, 21], [22, 23]])])
def test_each_rank_takes_its_contiguous_share_of_the_global_batch(dp_rank, micro_batches):
    run = SimpleNamespace(train=SimpleNamespace(global_batch_size=8, micro_batch_size=2))
    batches = data.rank_micro_batches(_Samples(), 16, run, dp_rank, 2)
    assert [b["tokens"][:, 0].tolist() for b in batches] == micro_batches
    assert [b["labels"].tolist() for b in batches] == [[[i + 100] for i in mb] for mb in micro_batches]
    assert [b["loss_mask"].tolist() for b in batches] == [[[0], [1]]] * 2
    assert batches[0]["tokens"].shape == (2, 2)


def test_documents_are_packed_only_for_indexed_data():
    run = SimpleNamespace(data=SimpleNamespace(packed_documents=True, kind="indexed"))
    assert data.packs_documents(run)
    run.data.kind = "mock"
    assert not data.packs_documents(run)
    run.data.kind, run.data.packed_documents = "indexed", False
    assert not data.packs_documents(run)


def test_model_inputs_unpacked_and_packed():
    batch = {"tokens": torch.tensor([[5, 1, 6], [7, 8, 9]]), "labels": torch.tensor([[1, 6, 2], [8, 9, 3]]),
             "loss_mask": torch.tensor([[1, 1, 0], [1, 0, 1]])}
    inputs, kwargs = data.model_inputs(batch, 1, False, "cpu")
    assert kwargs == {} and inputs["loss_mask"].dtype == torch.float32
    assert inputs["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert inputs["tokens"].tolist() == [[5, 1, 6], [7, 8, 9]] and inputs["labels"].tolist() == [[1, 6, 2], [8, 9, 3]]
    inputs, kwargs = data.model_inputs(batch, 1, True, "cpu")
    assert inputs["tokens"].tolist() == [[5, 1, 6, 7, 8, 9]] and inputs["labels"].tolist() == [[1, 6, 2, 8, 9, 3]]
    assert inputs["loss_mask"].tolist() == [[1.0, 1.0, 0.0, 1.0, 0.0, 1.0]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5]]
    assert kwargs["packed_seq_params"].cu_seqlens_q.tolist() == [0, 2, 3, 6]
    assert kwargs["packed_seq_params"].max_seqlen_q == 3


def _indexed(tmp_path, docs, eod):
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    for doc in docs:
        builder.add_document(torch.tensor(doc + [eod], dtype=torch.int32), [len(doc) + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def _null_tokenizer(path):
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(VOCAB - 1)  # ids < VOCAB, EOD = VOCAB - 1


def _indexed_run(prefix, *overrides):
    tok = os.path.join(os.path.dirname(prefix), "tok.model")
    open(tok, "w").close()  # load_tokenizer is replaced; the config only checks the file exists
    return _run("data.kind=indexed", f"data.blend=[{prefix}]", f"data.tokenizer={tok}", "train.seq_length=8",
                *overrides)


def test_indexed_datasets_read_the_corpus_as_it_is(tmp_path, monkeypatch):
    eod = VOCAB - 1
    monkeypatch.setattr(tokenizer, "load_tokenizer", _null_tokenizer)
    prefix = _indexed(tmp_path, [[10 + i] * 5 for i in range(8)], eod)  # 8 documents of 5 tokens + EOD: 48 tokens
    ds = data.build_datasets(_indexed_run(prefix, "data.split=1,0,0", "train.eval_interval=0"), VOCAB)
    assert ds.eod_id == eod and ds.valid is None
    assert 3 * 4 <= len(ds.train) < 2 * 3 * 4  # steps x global batch, not a whole extra epoch per sample
    sample = ds.train[0]
    assert set(sample) == {"tokens", "labels", "loss_mask", "position_ids"}  # no attention mask
    assert sample["position_ids"].tolist() == list(range(8))  # not reset at EOD
    assert sample["loss_mask"].tolist() == [1.0] * 8  # EOD is predicted, not masked
    assert (tmp_path / "cache").is_dir()  # the index cache sits next to the corpus by default
    elsewhere = tmp_path / "elsewhere"
    data.build_datasets(_indexed_run(prefix, "data.split=1,0,0", "train.eval_interval=0",
                                     f"data.cache_dir={elsewhere}"), VOCAB)
    assert any(elsewhere.iterdir())
    with_valid = data.build_datasets(_indexed_run(prefix, "data.split=1,1,0", "train.eval_interval=1",
                                                  "train.eval_iters=1"), VOCAB)
    assert with_valid.valid is not None and len(with_valid.valid) >= 4


@pytest.mark.parametrize("split, eval_interval, problem", [
    ("0,1,0", 0, "data: the train split is empty; give it a share in data.split"),
    ("1,0,0", 1, "data: train.eval_interval > 0 but the validation split is empty; give it a share in data.split"),
])
def test_an_empty_split_that_is_needed_is_refused(tmp_path, monkeypatch, split, eval_interval, problem):
    monkeypatch.setattr(tokenizer, "load_tokenizer", _null_tokenizer)
    prefix = _indexed(tmp_path, [[10] * 5] * 8, VOCAB - 1)
    with pytest.raises(ValueError, match=f"^{problem}$"):
        data.build_datasets(_indexed_run(prefix, f"data.split={split}", f"train.eval_interval={eval_interval}"), VOCAB)


def test_model_inputs_land_on_the_given_device():
    batch = {k: torch.ones(2, 3, dtype=torch.int64) for k in ("tokens", "labels", "loss_mask")}
    inputs, _ = data.model_inputs(batch, 1, False, "meta")  # a device the batch is not on
    assert {k: v.device.type for k, v in inputs.items()} == dict.fromkeys(inputs, "meta")


def test_the_sample_order_follows_the_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer, "load_tokenizer", _null_tokenizer)
    prefix = _indexed(tmp_path, [[10 + i] * 3 for i in range(16)], VOCAB - 1)

    def order(seed, cache):  # a fresh index cache each time: the order is computed, not read back
        ds = data.build_datasets(_indexed_run(prefix, "data.split=1,0,0", "train.eval_interval=0",
                                              f"train.seed={seed}", f"data.cache_dir={tmp_path / cache}"), VOCAB)
        return [ds.train[i]["tokens"].tolist() for i in range(6)]

    assert order(1, "a") == order(1, "b") != order(2, "c")


def test_every_rank_of_a_process_group_builds_its_datasets(tmp_path):
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        ds = data.build_datasets(_run("train.eval_interval=1", "train.eval_iters=1"), VOCAB)
        assert ds.train is not None and ds.valid is not None
    finally:
        dist.destroy_process_group()
