"""The tiny model the end-to-end tests train (by default the hybrid KLA, MLP, attention, MLP),
written as a model YAML for ``--set model=<path>``; each test overrides what it exercises."""
from __future__ import annotations

from pathlib import Path

import yaml

TINY_HYBRID = dict(vocab_size=512, hidden_size=32, num_layers=4, layer_pattern="K-*-", kla_heads=2, d_state=4,
                   num_attention_heads=4, max_seq_len=64)


def write_tiny_model(path, **overrides) -> Path:
    """``TINY_HYBRID`` with ``overrides`` as a model YAML at ``path``; returns the path."""
    path = Path(path)
    path.write_text(yaml.safe_dump({**TINY_HYBRID, **overrides}, sort_keys=False))
    return path
