"""The reference's warm-up + half-cosine schedule at fractional epochs, and the step-based schedules."""
import math
from types import SimpleNamespace

import pytest

from engine.schedule import adjust_learning_rate, lr_at


def _args(lr=1e-3, min_lr=0.0, warmup_epochs=1.0, epochs=2):
    return SimpleNamespace(lr=lr, min_lr=min_lr, warmup_epochs=warmup_epochs, epochs=epochs)


@pytest.mark.parametrize("epoch, expected", [
    (0.0, 0.0),            # the first optimizer step uses lr 0, as in the reference
    (0.25, 0.25e-3),
    (0.5, 0.5e-3),
    (1.0, 1e-3),           # end of warm-up: peak
    (1.5, 0.5e-3),         # half way down the half-cosine
    (1.75, 1e-3 * 0.5 * (1 + math.cos(math.pi * 0.75))),
    (2.0, 0.0),
])
def test_two_epochs_one_warmup(epoch, expected):
    assert lr_at(epoch, 1e-3, 0.0, 1.0, 2) == pytest.approx(expected, abs=1e-15)


def test_fractional_warmup_and_min_lr():
    # epochs 1 / warmup 0.4 (the MoLoRA scripts): warm-up over the first 40 %
    assert lr_at(0.2, 1.0, 0.0, 0.4, 1) == pytest.approx(0.5)
    assert lr_at(0.4, 1.0, 0.0, 0.4, 1) == pytest.approx(1.0)
    assert lr_at(0.7, 1.0, 0.0, 0.4, 1) == pytest.approx(0.5)
    # min_lr is the floor of the cosine, not of the warm-up
    assert lr_at(2.0, 1.0, 0.1, 1.0, 2) == pytest.approx(0.1)
    assert lr_at(1.5, 1.0, 0.1, 1.0, 2) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(0.0, 1.0, 0.1, 1.0, 2) == 0.0


def test_no_warmup_and_warmup_as_long_as_training():
    assert lr_at(0.0, 2.0, 0.0, 0.0, 3) == pytest.approx(2.0)
    assert lr_at(1.5, 2.0, 0.0, 0.0, 3) == pytest.approx(1.0)
    # warmup_epochs 40 > epochs (the reference's sparse_moe default): warm-up never ends
    assert lr_at(1.0, 1.0, 0.0, 40.0, 2) == pytest.approx(1.0 / 40)


def test_adjust_sets_every_group():
    groups = [{"params": [], "lr": 5.0}, {"params": [], "weight_decay": 0.1}]
    value = adjust_learning_rate(groups, 0.5, _args())
    assert value == pytest.approx(0.5e-3)
    assert [g["lr"] for g in groups] == [value, value]
    opt = SimpleNamespace(param_groups=[{"lr": 1.0}, {"lr": 2.0}])
    adjust_learning_rate(opt, 1.0, _args())
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(1e-3)] * 2


def test_step_schedules_match_transformers_warmup_formulas():
    from engine.schedule import StepSchedule, lr_at_step
    # warm-up lr·s/warmup from 0, then cosine to min_lr at the last step, as get_cosine_schedule_with_warmup
    s = StepSchedule(1.0, total_steps=110, warmup_steps=10, kind="cosine")
    assert [s(k, None) for k in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert s(60, None) == pytest.approx(0.5)
    assert s(110, None) == pytest.approx(0.0, abs=1e-15)
    assert lr_at_step(60, 110, 1.0, 0.1, 10, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at_step(60, 110, 1.0, 0.0, 10, "linear") == pytest.approx(0.5)
    assert lr_at_step(1000, 110, 1.0, 0.0, 10, "constant") == 1.0
    assert lr_at_step(3, 110, 2.0, 0.0, 0, "constant") == 2.0


def test_unknown_step_schedule_is_a_one_line_error():
    from engine.schedule import StepSchedule
    from Utils.errors import UserError
    with pytest.raises(UserError, match="lr_schedule"):
        StepSchedule(1.0, 10, kind="exp")
