"""Recurrent state for O(1)-per-token decoding."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Tuple

import torch


@dataclass
class KLALayerState:
    """One KLA layer's state: the last K-1 pre-conv inputs and the filter belief.

    conv ``[b, M_local, K-1]``; ssm ``(lam, eta)`` each ``[b, H_local, P, S]`` fp32.
    """

    conv: torch.Tensor
    ssm: Tuple[torch.Tensor, torch.Tensor]


@dataclass
class KLAInferenceState:
    """The model's decoding state: one ``KLALayerState`` per KLA layer, keyed by the global
    layer number, created lazily by the layers on first use and updated in place."""

    batch_size: int
    layers: Dict[int, KLALayerState] = field(default_factory=dict)

    def for_layer(self, layer_number: int, mixer) -> KLALayerState:
        if layer_number not in self.layers:
            self.layers[layer_number] = mixer.initial_inference_state(self.batch_size)
        return self.layers[layer_number]
