"""ReLU-1, the gate activation of LC-Net: clamp(z, 0, 1).

In training the gates need gradient where the clamp is flat, or a closed gate could never
reopen. Two ways to give it, both with a small ``slope`` outside [0, 1]:

- ``"straight_through"`` (default): the forward value is the hard clamp, exactly what eval
  computes; only the gradient has the slope outside [0, 1]. Training and eval run the same
  function, so a model that trains well also evaluates well.
- ``"leaky"``: the forward value itself is leaky (the paper's formulation). Gates can then
  exceed 1 or go negative in training, where eval clamps them: a train/eval gap that grows
  with the slope and the logits.

In eval both are the hard clamp, so exact zeros appear and work can be skipped.
"""

from __future__ import annotations

import torch
from torch import Tensor

MODES = ("straight_through", "leaky")


def leaky_relu1(z: Tensor, slope: float) -> Tensor:
    """clamp(z, 0, 1) with slope ``slope`` below 0 and above 1 (forward value leaky)."""
    return torch.where(z < 0, z * slope, torch.where(z > 1, 1 + (z - 1) * slope, z))


def relu1(z: Tensor, slope: float = 0.0, mode: str = "straight_through") -> Tensor:
    """Hard ReLU-1 when ``slope == 0``; otherwise the training variant named by ``mode``."""
    hard = z.clamp(0.0, 1.0)
    if slope == 0.0:
        return hard
    if mode == "leaky":
        return leaky_relu1(z, slope)
    if mode != "straight_through":
        raise ValueError(f"ReLU-1 mode must be one of {MODES}, got {mode!r}")
    leaky = leaky_relu1(z, slope)
    return hard + (leaky - leaky.detach())  # value of the clamp, gradient of the leaky version
