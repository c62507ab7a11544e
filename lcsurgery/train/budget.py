"""The MAC budget, in one place: the range a budget may take, the controller that steers the
penalty towards it while the gates learn, and the report of where a run ended.

The controller watches what eval will really execute: the hard per-image MACs of each training
batch (``last_macs``), not soft gate values, which can sit far from it (a gate at 0.3 costs 30%
in a soft formula and 100% in eval). It is a PI controller in log space over training progress
(not steps), so runs of any length reach the same strengths at the same point of training. The
target falls from the dense cost to the budget over the first ``ramp`` of training (gradual, as
in gradual pruning, Zhu and Gupta 2017: gates that all start at the same value would otherwise
cross zero together). Under the target the multiplier turns smoothly from closing to reopening
gates, continuous at the target so that gates do not chatter. Training batches see BatchNorm
in training mode and augmented images, so their cost differs from eval's; ``calibrate`` shifts
the target the batches are steered to by the gap measured on one model state.

``docs/training.md`` says how this design was arrived at and where it still misses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from lcsurgery.errors import LCSurgeryError

TOLERANCE = 0.05  # a run that ends further than this (relative) from its budget says so


def check_budget(budget: float) -> None:
    """Refuse a budget outside (0, 1]: it is a fraction of the dense model's MACs."""
    if not 0.0 < budget <= 1.0:
        raise LCSurgeryError(f"--budget is a fraction of the dense model's MACs and must be in (0, 1], got {budget}")


@dataclass
class BudgetController:
    """Multiplicative controller on the (smoothed) measured MAC fraction."""

    target: float  # fraction of the dense model's MACs, in (0, 1]
    strength: float = 1.0  # current penalty multiplier
    gain: float = 40.0  # integral: log-change over the whole run per unit of relative error
    proportional: float = 2.0  # proportional: log-factor per unit of relative error
    smoothing: float = 0.9  # exponential moving average of the measured fraction
    min_strength: float = 1e-3
    max_strength: float = 1e3
    ramp: float = 0.5  # fraction of training over which the target falls from 1 to ``target``
    band: float = 0.05  # relative error under the target over which the push turns from closing to reopening
    windup: float = 0.3  # largest relative error the integral integrates
    progress: float = 0.0  # fraction of training done, set by the training loop
    offset: float = 0.0  # eval fraction minus train fraction, measured by calibrate()
    measured: float | None = None  # smoothed train-batch fraction
    integral: float | None = None  # log of the integral part of the strength

    def __post_init__(self) -> None:
        check_budget(self.target)
        if self.integral is None:
            self.integral = math.log(self.strength)

    @property
    def current_target(self) -> float:
        """The target at this point of training: 1 at the start, ``target`` after the ramp."""
        t = min(self.progress / self.ramp, 1.0) if self.ramp > 0 else 1.0
        return 1.0 + (self.target - 1.0) * t

    @property
    def train_target(self) -> float:
        """The fraction training batches are steered to, so that eval lands on the current target."""
        return min(max(self.current_target - self.offset, 0.01), 1.0)

    def update(self, fraction: float, progress: float) -> float:
        """Feed one batch's mean MAC fraction and how far training is (0-1); returns the penalty strength."""
        dt = max(progress - self.progress, 0.0)
        self.progress = progress
        self.measured = fraction if self.measured is None else self.smoothing * self.measured + (1 - self.smoothing) * fraction
        error = (self.measured - self.train_target) / self.train_target
        lo, hi = math.log(self.min_strength), math.log(self.max_strength)
        reopening = self.progress >= self.ramp and error < 0
        # The integral winds at most at ``windup`` relative error (gates that have not yet crossed zero
        # must not build a strength that closes everything once they do), and holds while the
        # cost is under the budget: the reopening push below is as strong as the closing one was.
        step = 0.0 if reopening else max(min(error, self.windup), -self.windup)
        self.integral = min(max(self.integral + self.gain * step * dt, lo), hi)
        self.strength = math.exp(min(max(self.integral + self.proportional * error, lo), hi))
        if not reopening:
            return self.strength
        return self.strength * (1.0 + 2.0 * math.tanh(error / self.band))  # under the budget: ease off, then reopen gates

    def calibrate(self, eval_fraction: float, train_fraction: float) -> None:
        """Record how much eval's MACs exceed the training batches', both measured on one model state
        (not against the running average, which swings by a few percent from batch to batch)."""
        self.offset = eval_fraction - train_fraction

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def budget_report(fraction: float, budget: float) -> dict:
    """How far a run ended from its budget: the relative error and whether it is within ``TOLERANCE``."""
    error = fraction / budget - 1.0
    return {"budget_error": round(error, 4), "budget_met": abs(error) <= TOLERANCE}
