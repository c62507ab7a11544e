"""The budget controller's behaviour, step by step (no training run)."""

from __future__ import annotations

import pytest
import torch
from plant import simulate

from lcsurgery.train.budget import BudgetController


class TestBudgetController:
    def test_strength_rises_above_target_and_falls_below(self):
        c = BudgetController(0.5, ramp=0.0)
        up = [c.update(0.9, i / 500) for i in range(50)][-1]
        assert up > 1.0
        down = [c.update(0.1, (50 + i) / 500) for i in range(200)][-1]
        assert down < up

    def test_penalty_is_continuous_at_the_budget(self):
        """A hair above or below the target, the penalty is nearly the same: no chatter between a
        full closing push and none (the gates of a 20-epoch run chattered between the two)."""
        def after_ramp(fraction: float) -> float:
            c = BudgetController(0.5, ramp=0.5, smoothing=0.0, strength=10.0)
            return c.update(fraction, progress=0.8) / c.strength  # the multiplier over the controller's strength

        above, below = after_ramp(0.5005), after_ramp(0.4995)
        assert above == 1.0
        assert below == pytest.approx(above, rel=0.05)
        assert after_ramp(0.49) > 0 > after_ramp(0.48)  # eases off first, reopens further under
        assert after_ramp(0.30) == pytest.approx(-1.0, rel=0.01)

    def test_target_ramps_from_dense_to_budget(self):
        c = BudgetController(0.4, ramp=0.5)
        targets = []
        for p in (0.0, 0.25, 0.5, 0.9):
            c.update(0.9, progress=p)
            targets.append(c.current_target)
        assert targets == pytest.approx([1.0, 0.7, 0.4, 0.4])

    def test_calibration_shifts_the_training_target(self):
        c = BudgetController(0.5, ramp=0.0, smoothing=0.0)
        c.update(0.48, 0.1)
        c.calibrate(0.53, 0.48)  # eval costs 0.05 more than the training batches
        assert c.train_target == pytest.approx(0.45)

    def test_state_roundtrip(self):
        c = BudgetController(0.5)
        for f in (0.9, 0.8, 0.7):
            c.update(f, progress=0.1)
        d = BudgetController(0.5)
        d.load_state_dict(c.state_dict())
        assert d.update(0.6, 0.2) == c.update(0.6, 0.2)

    @pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
    def test_budget_outside_unit_interval(self, bad):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            BudgetController(bad)


def test_reopening_push_is_as_strong_as_the_closing_one():
    """Far under the budget after the ramp, the controller pays gates to reopen with the strength it
    had reached (the integral holds there), not with a strength that decays to nothing."""
    c = BudgetController(0.5, ramp=0.2, smoothing=0.0)
    for i in range(100):
        c.update(0.9, 0.2 + 0.003 * i)  # over the budget: the strength builds
    built = c.integral
    pushes = [c.update(0.1, 0.5 + 0.003 * i) for i in range(100)]  # a collapse far under it
    assert c.integral == built
    assert all(p < 0 for p in pushes)
    assert pushes[-1] == pytest.approx(-c.strength, rel=1e-6)


def test_integral_winds_at_most_at_the_windup_error():
    """While gates travel towards zero the cost stays high; the strength that builds meanwhile is
    capped as if the error were ``windup`` (it would otherwise close everything once they cross)."""
    far, near = BudgetController(0.5, ramp=0.0, smoothing=0.0), BudgetController(0.5, ramp=0.0, smoothing=0.0)
    for i in range(1, 51):
        far.update(1.0, i / 100)  # relative error 1.0
        near.update(0.5 * (1 + far.windup), i / 100)  # relative error exactly windup
    assert far.integral == pytest.approx(near.integral)


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.7])
def test_lands_within_five_percent_on_a_simulated_plant(budget):
    """On a simulated ResNet-20's gates (tests/plant.py: costs, Adam, task resistance, noise; seeded,
    float64, one thread) a trade-off-length run lands within 5% of every budget."""
    torch.set_num_threads(1)
    final, fractions = simulate(budget, steps=1170, seed=0)
    assert abs(final / budget - 1) <= 0.05, f"landed at {final:.3f} for {budget}"
    assert max(fractions[: len(fractions) // 5]) > 0.8 * 1.0  # the ramp starts from dense: no collapse at the start
