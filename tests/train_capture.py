"""Training runs through the real entry point (``kla_megatron.train.run``) with a look inside
each trainer just before it closes: for the tests that check its weights, optimizer or batches."""
from __future__ import annotations


def run_capturing(runs, capture):
    """For each argv of ``runs`` in turn, ``(history, captured)``: the run's history and the dict
    ``capture(trainer)`` returned when the trainer closed (empty if it never closed normally)."""
    import kla_megatron.training.trainer as trainer_mod
    from kla_megatron.train import run

    base, captured = trainer_mod.Trainer, {}

    class Capturing(base):
        def close(self, barrier: bool = True):
            if barrier:  # the normal close, not the cleanup after a failure
                captured.update(capture(self))
            super().close(barrier)

    trainer_mod.Trainer = Capturing
    out = []
    try:
        for argv in runs:
            captured.clear()
            out.append((run(argv), dict(captured)))
    finally:
        trainer_mod.Trainer = base
    return out
