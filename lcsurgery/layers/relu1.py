"""ReLU-1, the gate activation of LC-Net: clamp(z, 0, 1).

In training a *leaky* variant keeps a small slope outside [0, 1] so that closed or saturated
gates still receive gradient; in evaluation the hard clamp produces the exact zeros that let
work be skipped.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relu1(z: Tensor, slope: float = 0.0) -> Tensor:
    """Clamp ``z`` to [0, 1]; with ``slope > 0`` the pieces outside [0, 1] keep that slope."""
    if slope == 0.0:
        return z.clamp(0.0, 1.0)
    return torch.where(z < 0, z * slope, torch.where(z > 1, 1 + (z - 1) * slope, z))
