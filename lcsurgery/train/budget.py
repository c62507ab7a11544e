"""A MAC budget: adapt the penalty strength so eval-mode MACs land at a target fraction of dense.

The controller watches what eval will really execute: the hard per-image MACs of each
training batch (``lcsurgery.last_macs``), not the soft gate values, which can sit far from
it (a gate at 0.3 costs 30% in a soft formula and 100% in eval). It is a PI controller in
log space: the integral part scales the penalty up while batches cost more than the target
and down while they cost less; the proportional part reacts at once, which damps the
overshoot that comes from gates crossing zero together (they all start fully open). The
integral runs over training progress, not steps, so a 240-step run and a 2000-step run
reach the same strengths at the same point of training.

Gates that cross zero together can overshoot below the target, and a closed gate gets little
task gradient (ReLU-1 is flat there), so merely weakening the penalty would leave the cost
stuck low. Once the target has reached the budget, a cost below it scales the returned
multiplier by ``1 + 2 * tanh(error / band)``: it falls smoothly from ``strength`` at the target
through zero (2.7% under it, for the default band) to ``-strength`` far under it, where the
penalty pays gates to reopen. It must be continuous at the target: an earlier rule returned
``strength`` a hair above the target and about zero a hair below, so the gates of a 20-epoch
ResNet-20 run chattered between the two (43 of 78 logged steps at +17.7, 35 near or under
zero, the cost held at 0.498-0.504). That run then diverged, but for another reason: with this
rule alone a rerun diverged in the same epoch (see ``GatedBlock.masked_forward``).

The target is approached gradually (as in gradual pruning, Zhu & Gupta 2017): it falls from
the dense cost to the budget over the first ``ramp`` fraction of training, then holds while the
learning rate decays. Asking for the full budget from the first step makes the gates, which all
start at the same value, cross zero together: the cost collapses far below the budget and the
backbone has no time to adapt. Half of training is the default. A shorter ramp gives the
backbone more time at the budget, and on the shared ResNet-20 (3 epochs,
sequential, budget 0.5, backbone lr 0.03, distilling from a 3-epoch dense fine-tune; 2026-12-01)
a quarter ended at 86.33% top-1 against 85.90% for a half, within what one seed can tell. But
where a budget is met by skipping whole blocks (parallel 0.7 on the built-in shapes task) the
quarter ramp overshot to 0.64, and the gates froze at 62.5% of training before the reopening
push had brought the cost back (0.662 of dense, more than 5% under); the half ramp lands there.

Training batches see BatchNorm in training mode and augmented images, so their decisions
differ from eval's (zero-padded crops cost less: 0.672 of dense against 0.705 for one model on
plain images). After each epoch the loop measures both costs on the same model state and
``calibrate`` shifts the target the training batches are steered to by the gap.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


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
    progress: float = 0.0  # fraction of training done, set by the training loop
    offset: float = 0.0  # eval fraction minus train fraction, measured by calibrate()
    measured: float | None = None  # smoothed train-batch fraction
    integral: float | None = None  # log of the integral part of the strength

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"a MAC budget is a fraction of the dense model's MACs in (0, 1], got {self.target}")
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
        self.integral = min(max(self.integral + self.gain * error * dt, lo), hi)
        self.strength = math.exp(min(max(self.integral + self.proportional * error, lo), hi))
        if self.progress < self.ramp or error >= 0:
            return self.strength
        return self.strength * (1.0 + 2.0 * math.tanh(error / self.band))  # under the budget: ease off, then reopen gates

    def calibrate(self, eval_fraction: float, train_fraction: float) -> None:
        """Record how much eval's MACs exceed the training batches', both measured on one model state.

        Not against the running average: the batch cost swings by a few percent, and an offset
        taken at a trough (0.711 eval against 0.655) steered one run 4% under its budget."""
        self.offset = eval_fraction - train_fraction

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
