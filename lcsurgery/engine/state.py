"""``GateState``: the gate logits and values of one block's latest forward pass.

Both executions write it: masked execution (training, export) and the skip engine (eval). MAC
counting and the penalties read it, so nothing needs a second forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class GateState:
    """Gate values of the latest forward pass of one block.

    ``z_*`` are the gate logits (before ReLU-1); a gate is *on* in eval exactly when its logit is
    positive. ``s_*`` are the values the forward used (soft and differentiable in training).
    """

    z_l: Tensor | None  # [B]
    z_c: Tensor | None  # [B, C]
    s_l: Tensor | None
    s_c: Tensor | None
    pooled: Tensor | None = None  # [B, C_in] gate input (detached), kept in training for the penalty
    # Training only, detached: how much each image needs the block and each gated channel, read by
    # the importance-target loss (``lcsurgery.train.conditional``).
    channel_mass: Tensor | None = None  # [B, C] mean |activation| of each gated channel before gating
    residual_ratio: Tensor | None = None  # [B] mean |branch output| / mean |shortcut output|

    @property
    def batch(self) -> int:
        z = self.z_l if self.z_l is not None else self.z_c
        return z.shape[0]

    def keep(self) -> Tensor:
        """[B] bool: whether the block runs for each sample under hard gates."""
        if self.z_l is None:
            return torch.ones(self.batch, dtype=torch.bool, device=self.z_c.device)
        return self.z_l > 0

    def active(self) -> Tensor | None:
        """[B, C] bool: the gated channels each sample computes under hard gates (None: no C-Net)."""
        return None if self.z_c is None else self.z_c > 0
