"""Split one ShardedTensor into named per-component shards for dist checkpointing.

A fused projection whose rank-local layout is [a_r | b_r] (e.g. the mixer's in_proj,
[z_r | gate_r]) has a TP-dependent global layout; saving each component as its own
ShardedTensor (``<key>.z``, ``<key>.gate``) makes the checkpoint TP-independent. Same idea
as megatron-core's Mamba mixer (its private ``_split_tensor_factory``), written here so we
do not depend on a private function that moves between releases.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List

import torch
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def split_sharded_tensor(
    sharded: ShardedTensor, sections: List[int], names: List[str], split_dim: int
) -> ShardedTensorFactory:
    """A factory that saves/loads ``sharded`` as ``len(sections)`` sub-tensors along
    ``split_dim`` (local sizes ``sections``) named ``<key>.<name>``."""
    if not isinstance(sharded, ShardedTensor):
        raise TypeError(f"split_sharded_tensor needs a ShardedTensor, got {type(sharded).__name__}")
    if sum(sections) != sharded.local_shape[split_dim] or len(sections) != len(names):
        raise ValueError(
            f"split_sharded_tensor: sections {sections} must cover dim {split_dim} of local shape "
            f"{tuple(sharded.local_shape)} and match names {names}"
        )
    template = sharded.without_data()

    @torch.no_grad()
    def build(key, data, replica_id, flattened_range):
        whole = replace(template, key=key, data=data, dtype=data.dtype, replica_id=replica_id,
                        flattened_range=flattened_range)
        parts, start = [], 0
        for size, name in zip(sections, names):
            for part in whole.narrow(split_dim, start, size):
                part.key = f"{part.key}.{name}"
                parts.append(part)
            start += size
        return parts

    @torch.no_grad()
    def merge(parts):
        return torch.cat(parts, dim=split_dim)

    return ShardedTensorFactory(sharded.key, sharded.data, build, merge, sharded.replica_id)
