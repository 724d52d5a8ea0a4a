"""The reference's warm-up + half-cosine schedule at fractional epochs (SPEC §5.2 step 7)."""
import math
from types import SimpleNamespace

import pytest

from Utils.lr_sched import adjust_learning_rate, lr_at


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
