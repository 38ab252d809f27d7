"""Describe an indexed dataset: counts, document-length statistics, a token histogram
summary and a few decoded documents.

    kla-data inspect data/corpus_text_document --tokenizer tok.model --samples 3
"""
from __future__ import annotations

from typing import Optional

import numpy as np

_BLOCK = 1 << 24  # tokens per histogram block: bounded memory on any dataset size


def _token_histogram(tokens: np.ndarray) -> np.ndarray:
    counts = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), _BLOCK):
        block = np.bincount(np.asarray(tokens[start:start + _BLOCK], dtype=np.int64))
        if len(block) > len(counts):
            counts = np.pad(counts, (0, len(block) - len(counts)))
        counts[: len(block)] += block
    return counts


def inspect_dataset(prefix: str, tokenizer_model: Optional[str] = None, samples: int = 3, top: int = 10,
                    seed: int = 0, max_chars: int = 400) -> dict:
    """Return a JSON-able description of the dataset at ``prefix``."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from .merge import dataset_prefix

    prefix = dataset_prefix(prefix)
    ds = IndexedDataset(prefix, mmap=True)
    seq_lengths = ds.sequence_lengths.astype(np.int64)
    doc_idx = ds.document_indices
    doc_lengths = np.add.reduceat(seq_lengths, doc_idx[:-1]) if len(doc_idx) > 1 else np.zeros(0, np.int64)
    tokens = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    hist = _token_histogram(tokens)
    tok = None
    if tokenizer_model:
        from kla_megatron.tokenizers import load

        tok = load(tokenizer_model)  # any kind kla-preprocess reads

    def piece(i: int) -> Optional[str]:
        return tok.id_to_piece(i) if tok is not None and i < tok.vocab_size else None

    order = np.argsort(-hist, kind="stable")[:top]
    info = {
        "prefix": prefix,
        "dtype": np.dtype(ds.index.dtype).name,
        "documents": int(len(doc_idx) - 1),
        "sequences": int(len(seq_lengths)),
        "tokens": int(seq_lengths.sum()),
        "bin_bytes": int(tokens.nbytes),
        "document_tokens": _stats(doc_lengths),
        "distinct_token_ids": int((hist > 0).sum()),
        "max_token_id": int(len(hist) - 1) if len(hist) else None,
        "top_tokens": [{"id": int(i), "count": int(hist[i]), "piece": piece(int(i))} for i in order if hist[i] > 0],
    }
    if tok is not None:
        info["tokenizer_kind"] = tok.kind
        info["tokenizer_vocab_size"] = tok.vocab_size
        info["eod_id"] = tok.eod
        info["eod_count"] = int(hist[tok.eod]) if tok.eod < len(hist) else 0
        info["ids_outside_vocab"] = int(hist[tok.vocab_size:].sum())
        rng = np.random.default_rng(seed)
        picks = sorted(rng.choice(info["documents"], size=min(samples, info["documents"]), replace=False).tolist())
        info["samples"] = []
        for d in picks:
            ids = np.concatenate([ds[s] for s in range(doc_idx[d], doc_idx[d + 1])]).tolist()
            text = tok.decode(ids)
            info["samples"].append({"document": d, "tokens": len(ids), "text": text[:max_chars],
                                    "truncated": len(text) > max_chars})
    return info


def _stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {}
    q = np.percentile(x, [50, 90, 99])
    return {"min": int(x.min()), "mean": float(x.mean()), "p50": float(q[0]), "p90": float(q[1]),
            "p99": float(q[2]), "max": int(x.max())}


def format_info(info: dict) -> str:
    dt = info["document_tokens"]
    lines = [
        f"dataset        {info['prefix']}  (dtype {info['dtype']}, {info['bin_bytes'] / 1e6:.2f} MB)",
        f"documents      {info['documents']}",
        f"sequences      {info['sequences']}",
        f"tokens         {info['tokens']}",
    ]
    if dt:
        lines.append(f"doc tokens     min {dt['min']}  mean {dt['mean']:.1f}  p50 {dt['p50']:.0f}  "
                     f"p90 {dt['p90']:.0f}  p99 {dt['p99']:.0f}  max {dt['max']}")
    lines.append(f"token ids      {info['distinct_token_ids']} distinct, max id {info['max_token_id']}")
    if "tokenizer_vocab_size" in info:
        lines.append(f"tokenizer      {info['tokenizer_kind']}, vocab {info['tokenizer_vocab_size']}, EOD id {info['eod_id']} "
                     f"seen {info['eod_count']} times, {info['ids_outside_vocab']} ids outside the vocab")
    lines.append("top tokens     " + ", ".join(
        f"{t['id']}{'' if t['piece'] is None else ' ' + repr(t['piece'])}: {t['count']}" for t in info["top_tokens"]))
    for s in info.get("samples", []):
        lines.append(f"--- document {s['document']} ({s['tokens']} tokens"
                     f"{', truncated' if s['truncated'] else ''}) ---")
        lines.append(s["text"])
    return "\n".join(lines)
