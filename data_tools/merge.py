"""Merge several indexed datasets into one, in the order given (megatron-core's
``IndexedDatasetBuilder.add_index``). All inputs must share a token dtype.

    kla-data merge --input data/part_*_text_document --output-prefix data/all_text_document
"""
from __future__ import annotations

import glob
import os
from typing import List

from .atomic import check_output_free, commit_dataset, partial_paths, remove_partials


def dataset_prefix(path: str) -> str:
    """``x``, ``x.bin`` or ``x.idx`` -> ``x``; both files must exist."""
    prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
    missing = [p for p in (prefix + ".bin", prefix + ".idx") if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{path!r} is not an indexed dataset: {missing[0]} does not exist")
    return prefix


def expand_prefixes(patterns: List[str]) -> List[str]:
    """Dataset prefixes from prefixes, .idx/.bin paths or globs (a glob matches .idx files)."""
    out: List[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            pat = pattern if pattern.endswith((".idx", ".bin")) else pattern + ".idx"
            matched = sorted({p[:-4] for p in glob.glob(pat)})
            if not matched:
                raise ValueError(f"glob {pattern!r} matches no indexed dataset")
            out.extend(dataset_prefix(p) for p in matched)
        else:
            out.append(dataset_prefix(pattern))
    if not out:
        raise ValueError("no input datasets given")
    return out


def merge_datasets(inputs: List[str], output_prefix: str, overwrite: bool = False) -> dict:
    """Concatenate the datasets ``inputs`` into ``output_prefix``; returns counts."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexReader

    prefixes = expand_prefixes(inputs)
    out = output_prefix[:-4] if output_prefix.endswith((".bin", ".idx")) else output_prefix
    if out in prefixes:
        raise ValueError(f"output {out!r} is also an input")
    check_output_free(out, overwrite)
    readers = [(p, _IndexReader(p + ".idx", multimodal=False)) for p in prefixes]
    dtypes = {np.dtype(r.dtype).name for _, r in readers}
    if len(dtypes) != 1:
        listing = ", ".join(f"{p} ({np.dtype(r.dtype).name})" for p, r in readers)
        raise ValueError(f"cannot merge datasets with different token dtypes: {listing}; "
                         "re-run preprocess with one tokenizer")
    dtype = readers[0][1].dtype
    documents = sum(len(r.document_indices) - 1 for _, r in readers)
    sequences = sum(len(r) for _, r in readers)
    tokens = sum(int(r.sequence_lengths.sum()) for _, r in readers)
    del readers

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp_bin, tmp_idx = partial_paths(out)
    try:
        builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(tmp_idx)
        commit_dataset(tmp_bin, tmp_idx, out)
    finally:
        remove_partials(tmp_bin, tmp_idx)
    return {"output": out, "inputs": prefixes, "documents": documents, "sequences": sequences, "tokens": tokens,
            "dtype": np.dtype(dtype).name}
