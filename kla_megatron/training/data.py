"""Training and validation batches from megatron-core datasets.

Data position is the number of samples consumed so far, C: the next optimizer step consumes
global samples ``[C, C + G)`` (G = global batch size); data-parallel rank ``r`` of ``D`` takes
the contiguous ``G / D`` of them, cut into micro-batches. So the checkpointed data position is
just C, and a run resumed under a different data-parallel size sees exactly the same global
batches. Validation always uses the same first batches of the
validation split, so validation losses are comparable across a run.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from .config import RunConfig


@dataclass
class Datasets:
    train: object
    valid: object | None
    eod_id: int


def _tokenizer(run: RunConfig, vocab_size: int):
    if run.data.kind == "indexed":
        from .tokenizer import load_tokenizer  # the loader kla-preprocess used: same ids, same EOD

        tok = load_tokenizer(run.data.tokenizer)
        if tok.vocab_size > vocab_size:
            raise ValueError(f"data: tokenizer {run.data.tokenizer} has {tok.vocab_size} tokens but the model's "
                             f"vocab_size is {vocab_size}; use a model config with vocab_size >= {tok.vocab_size}")
        return tok
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(vocab_size - 1)  # NullTokenizer's eod is its vocab_size, so keep it < vocab_size


def build_datasets(run: RunConfig, vocab_size: int) -> Datasets:
    """Build train/valid datasets with megatron's BlendedMegatronDatasetBuilder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    t = run.train
    tok = _tokenizer(run, vocab_size)
    n_train = t.steps * t.global_batch_size
    n_valid = t.eval_iters * t.global_batch_size if t.eval_interval else 0
    common = dict(random_seed=t.seed, sequence_length=t.seq_length, tokenizer=tok,
                  reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                  create_attention_mask=False, mmap_bin_files=True)
    if run.data.kind == "mock":
        cfg = GPTDatasetConfig(split="1,1,1" if n_valid else "1,0,0", **common)
        cls = MockGPTDataset
    else:
        run.data.check_paths()
        weights, prefixes = run.data.weights_and_prefixes()
        cache = run.data.cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefixes[0])), "cache")
        blend = (prefixes, weights)
        cfg = GPTDatasetConfig(blend=blend, split=run.data.split, path_to_cache=cache, **common)
        cls = GPTDataset
    # Every rank reads its own batches; the builder lets rank 0 write the index cache first.
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, [n_train, n_valid or None, None], lambda: True, cfg).build()
    if train is None:
        raise ValueError("data: the train split is empty; give it a share in data.split")
    if n_valid and valid is None:
        raise ValueError("data: train.eval_interval > 0 but the validation split is empty; give it a share in data.split")
    return Datasets(train=train, valid=valid if n_valid else None, eod_id=int(tok.eod))


def _collate(dataset, indices: list[int]) -> dict[str, torch.Tensor]:
    samples = [dataset[i] for i in indices]
    return {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in ("tokens", "labels", "loss_mask")}


def rank_micro_batches(dataset, first_sample: int, run: RunConfig, dp_rank: int, dp_size: int) -> list[dict]:
    """Micro-batches of this data-parallel rank for the global batch starting at ``first_sample``."""
    t = run.train
    per_rank = t.global_batch_size // dp_size
    start = first_sample + dp_rank * per_rank
    return [_collate(dataset, list(range(start + m, start + m + t.micro_batch_size)))
            for m in range(0, per_rank, t.micro_batch_size)]


def document_cu_seqlens(tokens: torch.Tensor, eod_id: int) -> torch.Tensor:
    """Cumulative document lengths of a packed [b, s] batch, flattened row after row.

    A document ends after each EOD token and at the end of every row, so the KLA state is reset
    at document starts instead of carrying across unrelated text.
    """
    b, s = tokens.shape
    ends = [0]
    for row in range(b):
        eod = (tokens[row] == eod_id).nonzero().flatten() + 1
        row_ends = [int(e) for e in eod if e < s] + [s]
        ends.extend(row * s + e for e in row_ends)
    return torch.tensor(ends, dtype=torch.int32)


def packed_seq_params(tokens: torch.Tensor, eod_id: int):
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = document_cu_seqlens(tokens, eod_id)
    max_len = int((cu[1:] - cu[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           max_seqlen_q=max_len, max_seqlen_kv=max_len)


def packs_documents(run: RunConfig) -> bool:
    """Whether batches carry document boundaries to the model (indexed data with packed_documents)."""
    return run.data.packed_documents and run.data.kind == "indexed"


def model_inputs(batch: dict, eod_id: int, packed: bool, device) -> tuple[dict, dict]:
    """A micro-batch as the model takes it, on ``device``: ``tokens``, ``labels``, ``loss_mask``
    (float) and ``position_ids``, each ``[b, s]``, and the model's keyword arguments.

    Packed (``packed``), the micro-batch becomes one row of b·s tokens with ``packed_seq_params``:
    every row end is a document end too, so flattening changes nothing but the layout.
    """
    tokens, labels = batch["tokens"].to(device), batch["labels"].to(device)
    loss_mask = batch["loss_mask"].to(device).float()
    kwargs = {}
    if packed:
        kwargs["packed_seq_params"] = packed_seq_params(tokens, eod_id)
        tokens, labels, loss_mask = tokens.reshape(1, -1), labels.reshape(1, -1), loss_mask.reshape(1, -1)
    b, s = tokens.shape
    position_ids = torch.arange(s, device=device).unsqueeze(0).expand(b, s)
    return dict(tokens=tokens, labels=labels, loss_mask=loss_mask, position_ids=position_ids), kwargs
