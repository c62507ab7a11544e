"""Optimiser parameter groups: backbone and gates learn at their own rates."""

from __future__ import annotations

from torch import nn

from lcsurgery.surgery.model import GATE_PREFIX, unwrap

GATE_LR_FACTOR = 10.0  # retrofitting: gates must move from 1 to 0 within a short fine-tune


def param_groups(model: nn.Module, lr: float, gate_lr: float | None = None, weight_decay: float = 5e-4) -> list[dict]:
    """Two optimiser groups: the backbone (``lr``, ``weight_decay``) and the gates (``gate_lr``, no decay).

    The paper trains gates from scratch at 1e-5 beside a backbone at 5e-3. Retrofitting a
    pretrained backbone in a few epochs needs the opposite: the gates start fully open and
    must travel to zero, so the default gate rate is ``GATE_LR_FACTOR`` x ``lr``. Gates get no
    weight decay: it would shrink the gate logits towards 0, the decision boundary.
    """
    lc = unwrap(model)
    gate_lr = lr * GATE_LR_FACTOR if gate_lr is None else gate_lr
    backbone, gates = [], []
    for name, p in lc.named_parameters():
        if p.requires_grad:
            (gates if name.startswith(GATE_PREFIX + ".") else backbone).append(p)
    return [
        {"params": backbone, "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
        {"params": gates, "lr": gate_lr, "weight_decay": 0.0, "name": "gates"},
    ]
