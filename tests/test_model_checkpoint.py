"""A distributed checkpoint saved under one parallel layout loads under another with the
same loss: TP=2 → TP=1 → PP=2 → TP=2×PP=2, and PP=2 → TP=2, for a hybrid pattern with the
"mamba" preset (the split in_proj, the low-rank variance, attention and MLP all reshard)
and a pure KLA model with tied embeddings (the output weight lives on two stages under PP).
One 4-rank gloo job (spare ranks are data-parallel replicas).
"""
import os

import pytest
import torch

from tests import test_model_helpers as h
from tests.dist_utils import run_on_ranks

MODELS = {"hybrid_mamba": ("K*K-", "mamba", {}), "kla_tied": ("KK-K", "plain", dict(tie_embeddings=True))}
# (name, tp, pp, checkpoint to load or None, checkpoint to save or None)
STEPS = [
    ("tp2_save", 2, 1, None, "a"),
    ("tp1_load", 1, 1, "a", "b"),
    ("pp2_load", 1, 2, "b", "c"),
    ("tp2pp2_load", 2, 2, "c", None),
    ("tp2_from_pp2", 2, 1, "c", None),
]


def _body(rank, world_size, root):
    return {key: _chain(rank, os.path.join(root, key), *spec) for key, spec in MODELS.items()}


def _chain(rank, root, pattern, preset, extra):
    from megatron.core import dist_checkpointing

    losses = {}
    for name, tp, pp, load, save in STEPS:
        h.setup_parallel(tp, pp, seed=10 + len(losses))  # a different random init every step
        model = h.build(h.tiny_config(pattern, preset, **extra), tp, pp)
        if load is None:
            h.det_init(model)
        else:
            losses[f"{name}_before_load"] = h.run_schedule(model, h.batches(), forward_only=True)
            state = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(root, load))
            model.load_state_dict(state)
        losses[name] = h.run_schedule(model, h.batches(), forward_only=True)
        if save is not None:
            path = os.path.join(root, save)
            if rank == 0:
                os.makedirs(path, exist_ok=True)
            torch.distributed.barrier()
            dist_checkpointing.save(model.sharded_state_dict(), path)
            torch.distributed.barrier()
    return losses


@pytest.fixture(scope="module")
def losses(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("kla_ckpt"))
    return run_on_ranks(_body, world_size=4, args=(root,))


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("step", [s[0] for s in STEPS[1:]])
def test_checkpoint_reshards_with_identical_loss(losses, model, step):
    losses = [r[model] for r in losses]
    reference = losses[0]["tp2_save"]
    reported = [r[step] for r in losses if r[step] is not None]
    assert reported, "no rank reported a loss"
    for loss in reported:
        assert loss == pytest.approx(reference, rel=1e-6, abs=0)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("step", [s[0] for s in STEPS[1:]])
def test_loss_before_loading_differs(losses, model, step):
    # Guards the test itself: the freshly initialised model is a different function.
    losses = [r[model] for r in losses]
    reference = losses[0]["tp2_save"]
    for r in losses:
        if r[f"{step}_before_load"] is not None:
            assert abs(r[f"{step}_before_load"] - reference) > 1e-3 * abs(reference)
