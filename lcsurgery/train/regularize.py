"""Gate regularisation: the L1 penalty on S_L and S_C that makes LC-Net skip work.

``gate_l1`` reads the gate inputs of the latest forward (no second pass through the network).
It recomputes the gates from the *detached* pooled block inputs: the penalty trains the gates
only. Were it to flow into the backbone through the gates' inputs, a strong penalty would warp
the features themselves to close gates, and wreck a pretrained backbone within a few hundred
steps. The task loss trains both, but the
gates' inputs are detached in the block itself (see ``GatedBlock.masked_forward``), so the
backbone learns only through its own branches. It is the mean over
gate groups (each block's L-gate, each block's C-gates) of the batch-mean gate value, so it is
1 with every gate open whatever the depth, and one penalty strength works across models.

The penalty of a gate is its leaky ReLU-1 value (slope outside [0, 1]) floored at ``-slope``,
that is at z = -1: below the decision boundary it keeps pushing a closed gate down to a clear
margin, and stops there. An absolute value would pull closed gates back up to the boundary,
where the hard decision flips at random; an unfloored value would push them down for ever,
so that reopening a gate the task needs would take ever longer.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.layers.relu1 import leaky_relu1
from lcsurgery.macs.static import static_costs
from lcsurgery.surgery.model import LCModel, check_placement, unwrap


def _values(lc: LCModel) -> list[tuple[Tensor | None, Tensor | None]]:
    """Per block, the gate values of the latest batch recomputed from detached inputs, floored."""
    out = []
    for b in lc.lc_blocks():
        if b.last is None or b.last.pooled is None:
            raise LCSurgeryError("gate_l1 needs a forward pass in training mode first (it reads the gate inputs of the latest batch)")
        out.append(tuple(None if z is None else leaky_relu1(z, b.slope).clamp(min=-b.slope) for z in b.gate_logits(b.last.pooled, weights=not b.weights_from_targets)))
    return out


def gate_l1(model: nn.Module, cost_aware: bool = False, placement: str | None = None) -> Tensor:
    """L1 penalty of the latest forward's gates, in [0, 1] for eval-range gate values.

    ``cost_aware=True`` weights each gate by the MACs it controls under ``placement`` (default:
    the model's): an L-gate by the whole block, a C-gate by one channel of the first conv
    (sequential only), the per-channel ops and the next conv. The weights are normalised to
    sum to 1, so the value is again 1 with every gate open.
    """
    lc = unwrap(model)
    values = _values(lc)
    if not cost_aware:
        terms = [s.mean() for pair in values for s in pair if s is not None]
        return torch.stack(terms).mean()
    placement = placement or lc.placement
    check_placement(placement)
    costs = static_costs(lc, lc.__dict__["lc_last_input_size"])
    total, norm = 0.0, 0
    for (s_l, s_c), c in zip(values, costs.blocks, strict=True):
        per_channel = c.per_channel(placement)
        if s_l is not None:
            weight = c.fixed(placement) + c.channels * per_channel
            total = total + weight * s_l.mean()
            norm += weight
        if s_c is not None:
            total = total + per_channel * s_c.sum(1).mean()
            norm += per_channel * c.channels
    return total / norm


def _step(z: Tensor, temperature: float) -> Tensor:
    """Heaviside ``z > 0`` (what eval executes) with the gradient of sigmoid(z / temperature)."""
    soft = torch.sigmoid(z / temperature)
    return (z > 0).to(z.dtype) + (soft - soft.detach())


def macs_penalty(model: nn.Module, placement: str | None = None, temperature: float = 0.5, image_weights: Tensor | None = None) -> Tensor:
    """The latest batch's mean hard MACs as a fraction of dense, differentiable in the gates.

    Its value is exactly ``last_macs(model).mean() / dense``: the cost eval would pay for these
    gate logits. Each on/off decision is a step function with a sigmoid surrogate gradient, and
    the cost formula is the exact one (a channel is charged only where its block runs). Unlike
    ``gate_l1``, it charges a gate at 0.2 as much as a gate at 1: it does not reward attenuating
    a branch that still costs its MACs, only closing it (under L1, retrofitted gates settle at
    small positive values: accuracy lost, nothing skipped). Like ``gate_l1`` it trains the gates only.
    ``image_weights`` [B] (mean 1) weight each image's cost in the mean: some images are pushed
    harder to close gates than others.
    """
    lc = unwrap(model)
    placement = placement or lc.placement
    check_placement(placement)
    costs = static_costs(lc, lc.__dict__["lc_last_input_size"])
    total = torch.tensor(float(costs.base + sum(c.gate + c.shortcut for c in costs.blocks)))
    for b, c in zip(lc.lc_blocks(), costs.blocks, strict=True):
        if b.last is None or b.last.pooled is None:
            raise LCSurgeryError("macs_penalty needs a forward pass in training mode first (it reads the gate inputs of the latest batch)")
        z_l, z_c = b.gate_logits(b.last.pooled, weights=not b.weights_from_targets)
        runs = _step(z_l, temperature) if z_l is not None else 1.0
        active = _step(z_c, temperature).sum(1) if z_c is not None else 0.0
        total = total + runs * (c.fixed(placement) + active * c.per_channel(placement))
    if image_weights is not None:
        total = total * image_weights.to(total.dtype)
    return total.mean() / costs.dense
