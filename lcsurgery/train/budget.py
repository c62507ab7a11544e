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

When the gates stop learning, ``land`` checks the cost eval will pay on held-out training images.
Gates whose decisions flip for every image at once (static gates, or a short run's avalanche)
can leave it further from the budget than any controller can help; then whole gates are flipped,
those nearest their threshold first, and no other gate is touched (a common shift of every
logit would also rescale every gate value in (0, 1), which costs accuracy).
``docs/training.md`` says how this design was arrived at and where it still misses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.dynamic import count_macs
from lcsurgery.surgery.model import unwrap

TOLERANCE = 0.05  # a run that ends further than this (relative) from its budget says so
LANDING_TOLERANCE = 0.02  # when the gates freeze further than this from the budget, whole gates are flipped


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


@dataclass(frozen=True)
class Landing:
    """What ``land`` did: the MAC fraction before and after, and how many gates it closed or opened."""

    before: float
    after: float
    closed: int = 0
    opened: int = 0

    def as_dict(self) -> dict:
        return {"before": round(self.before, 4), "after": round(self.after, 4), "closed": self.closed, "opened": self.opened}


@torch.no_grad()
def land(model: nn.Module, images: Sequence[Tensor], budget: float, placement: str, tolerance: float = LANDING_TOLERANCE) -> Landing:
    """Bring eval-mode MACs on ``images`` within ``tolerance`` (relative) of ``budget`` by flipping whole gates.

    Over budget, the gates that are on for some image are closed for every image, lowest mean
    logit first (the least sure, whose values are smallest); under it, closed gates are opened
    (their smallest logit set to 1, a full-valued channel), highest mean logit first. How many to
    flip is found by bisection, once over the channel gates alone (fine steps) and once over all
    gates (a layer gate moves the cost by a whole block); the flips that end nearer the budget are
    kept, and only the flipped gates' biases change. ``images`` are held-out training images,
    never the test set. The model is left in the mode it was in.
    """
    check_budget(budget)
    lc = unwrap(model)
    training = lc.training
    lc.eval()
    try:
        before = count_macs(lc, list(images), placement, progress=False).ratio
        if abs(before / budget - 1) <= tolerance:
            return Landing(before, before)
        closing = before > budget
        gates = _gate_logit_ranges(lc, images)  # (layer, index, mean, min, max, is a channel gate) of every gate
        if closing:  # gates on for some image, least sure first
            candidates = sorted((g for g in gates if g[4] > 0), key=lambda g: g[2])
        else:  # gates off for some image, nearest to opening first
            candidates = sorted((g for g in gates if g[3] <= 0), key=lambda g: g[2], reverse=True)
        start = [float(lin.bias[i]) for lin, i, *_ in candidates]

        def fraction(flip: list[bool]) -> float:
            """The MAC fraction with the flagged candidates flipped (closed below their largest
            logit, or opened to a smallest logit of 1) and the rest as they were."""
            for (lin, i, _, low, high, _), bias, f in zip(candidates, start, flip, strict=True):
                lin.bias[i] = bias if not f else bias - high - 0.5 if closing else bias + 1.0 - low
            return count_macs(lc, list(images), placement, progress=False).ratio

        def first(k: int, allowed: list[bool]) -> list[bool]:
            """Flags for the first ``k`` allowed candidates."""
            ranks = list(itertools.accumulate(allowed))
            return [a and r <= k for a, r in zip(allowed, ranks, strict=True)]

        def search(allowed: list[bool]) -> tuple[float, list[bool]]:
            # the fraction moves monotonically with k (more closed: cheaper): the first k past the budget
            lo, hi = 0, sum(allowed)
            while lo < hi:
                mid = (lo + hi) // 2
                f = fraction(first(mid, allowed))
                if (f <= budget) if closing else (f >= budget):
                    hi = mid
                else:
                    lo = mid + 1
            options = [first(k, allowed) for k in {max(lo - 1, 0), lo}]
            return min((abs(fraction(flags) - budget), flags) for flags in options)

        channel_only = search([g[5] for g in candidates])
        best = channel_only if abs(channel_only[0] / budget) <= tolerance else min(channel_only, search([True] * len(candidates)))
        after = fraction(best[1])
        flipped = sum(best[1])
        return Landing(before, after, closed=flipped if closing else 0, opened=0 if closing else flipped)
    finally:
        lc.train(training)


def _gate_logit_ranges(lc: nn.Module, images: Sequence[Tensor]) -> list[tuple[nn.Linear, int, float, float, float, bool]]:
    """Every gate (its layer and output index) with its mean, min and max logit over ``images``, in
    eval mode, and whether it is a channel gate."""
    sums: dict = {}
    channel = {b.c_net for b in lc.lc_blocks() if b.c_net is not None}
    for x in images:
        lc(x)
        for b in lc.lc_blocks():
            for lin, z in ((b.l_net, b.last.z_l), (b.c_net, b.last.z_c)):
                if lin is None:
                    continue
                z = z.reshape(len(x), -1).double().cpu()
                total, lo, hi, n = sums.get(lin, (0.0, None, None, 0))
                sums[lin] = (total + z.sum(0), z.min(0).values if lo is None else torch.minimum(lo, z.min(0).values), z.max(0).values if hi is None else torch.maximum(hi, z.max(0).values), n + len(x))
    out = []
    for lin, (total, lo, hi, n) in sums.items():
        for i in range(lin.out_features):
            out.append((lin, i, float(total[i] / n), float(lo[i]), float(hi[i]), lin in channel))
    return out
