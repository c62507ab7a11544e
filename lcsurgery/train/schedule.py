"""Gate schedules over training: when the gates stop learning, and how their noise fades."""

from __future__ import annotations

from torch import nn

from lcsurgery.surgery.convert import gated_blocks


def gates_frozen(progress: float, freeze_gates: float | None) -> bool:
    """Whether the gates have stopped learning at this share of training (then no penalty either)."""
    return freeze_gates is not None and progress >= freeze_gates


def noise_factor(progress: float, ramp: float, end: float | None = None) -> float:
    """Gate noise over training: full while the MAC target ramps down, then fading to zero by
    ``end`` (default: halfway from the end of the ramp to the last step), so that the
    gates settle, and training ends, on exactly the function eval computes."""
    end = (1.0 + ramp) / 2 if end is None else end
    return min(max(1.0 - (progress - ramp) / (end - ramp), 0.0), 1.0)


def set_gate_training(model: nn.Module, noise: float, stats_momentum: float, weights_from_targets: bool = False) -> None:
    """This step's gate noise and input-statistics momentum, and whether the gate weights learn
    from per-image targets only, on every gated block."""
    for block in gated_blocks(model):
        block.noise = noise
        block.stats_momentum = stats_momentum
        block.weights_from_targets = weights_from_targets
