"""Exact learning rates of every schedule branch (training/schedule.py), worked out by hand:
warmup, cosine and linear after warmup, constant, the three WSD decay shapes, the WSD decay
length (decay_steps, decay_fraction, the 20 % default, at least one step) and apply_lr's
per-group multipliers. Written against bench/mutation.sh's surviving mutants."""
import math

import pytest

from kla_megatron.training.config import TrainConfig
from kla_megatron.training.schedule import apply_lr, lr_at, wsd_decay_steps


def _t(**kw):
    base = dict(lr=2.0, min_lr=0.5, steps=10, warmup_steps=0)
    return TrainConfig(**{**base, **kw})


def test_warmup_is_linear_from_lr_over_warmup_steps_then_the_schedule_starts_at_lr():
    t = _t(lr_schedule="cosine", warmup_steps=4)
    assert [lr_at(t, s) for s in range(4)] == [0.5, 1.0, 1.5, 2.0]
    assert lr_at(t, 4) == 2.0  # first post-warmup step: frac 0 of the 6 remaining


@pytest.mark.parametrize("schedule, at_step_6", [("cosine", 0.5 + 1.5 * 0.75), ("linear", 0.5 + 1.5 * (2 / 3))])
def test_cosine_and_linear_run_over_the_steps_after_warmup_down_to_min_lr(schedule, at_step_6):
    t = _t(lr_schedule=schedule, warmup_steps=4)
    assert lr_at(t, 6) == pytest.approx(at_step_6)  # frac = 2 / (10 - 4)
    assert lr_at(t, 10) == pytest.approx(0.5) and lr_at(t, 20) == pytest.approx(0.5)  # clamped at min_lr


def test_schedule_as_long_as_its_warmup_drops_to_min_lr_one_step_after():
    t = _t(lr_schedule="linear", steps=4, warmup_steps=4)
    assert lr_at(t, 4) == 2.0 and lr_at(t, 5) == 0.5


def test_constant_schedule_keeps_lr_after_warmup():
    assert [lr_at(_t(lr_schedule="constant", warmup_steps=2), s) for s in (0, 1, 2, 50)] == [1.0, 2.0, 2.0, 2.0]
    assert lr_at(_t(lr_schedule="constant"), 0) == 2.0


@pytest.mark.parametrize("style, shape", [("linear", 0.75), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))),
                                          ("1-sqrt", 0.5)])
def test_wsd_is_stable_then_decays_with_its_shape_to_min_lr(style, shape):
    t = _t(lr_schedule="wsd", decay_steps=4, wsd_decay_style=style)
    assert lr_at(t, 0) == 2.0 and lr_at(t, 5) == 2.0  # decay starts at 10 - 4
    assert lr_at(t, 6) == pytest.approx(0.5 + 1.5 * shape)  # frac = 1/4
    assert lr_at(t, 9) == pytest.approx(0.5) and lr_at(t, 12) == pytest.approx(0.5)


def test_wsd_one_step_decay_lands_on_min_lr():
    t = _t(lr_schedule="wsd", decay_steps=1)
    assert lr_at(t, 8) == 2.0 and lr_at(t, 9) == 0.5


def test_wsd_decay_length():
    assert wsd_decay_steps(_t(decay_steps=3)) == 3
    assert wsd_decay_steps(_t(steps=7, decay_fraction=0.3)) == 2  # round(2.1)
    assert wsd_decay_steps(_t(steps=20)) == 4  # the 20 % default
    assert wsd_decay_steps(_t(steps=2)) == 1  # never zero steps
    assert isinstance(wsd_decay_steps(_t(steps=7, decay_fraction=0.3)), int)


def test_apply_lr_scales_each_group_and_returns_the_base_lr():
    groups = [{"lr_mult": 0.1, "wd_mult": 0.0}, {}]
    t = _t(lr_schedule="constant", weight_decay=0.2)
    assert apply_lr(groups, t, 3) == 2.0
    assert groups[0]["lr"] == pytest.approx(0.2) and groups[0]["weight_decay"] == 0.0
    assert groups[1]["lr"] == 2.0 and groups[1]["weight_decay"] == 0.2


def test_apply_lr_uses_the_schedule_at_the_given_step():
    groups = [{"lr_mult": 0.5}]
    assert apply_lr(groups, _t(lr_schedule="cosine", warmup_steps=4), 1) == 1.0  # warmup: 2 * 2 / 4
    assert groups[0]["lr"] == 0.5
