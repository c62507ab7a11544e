"""Optimisers and learning-rate schedules: backbone and gates learn at their own rates.

The backbone takes SGD (Nesterov) on a cosine schedule; the gates take Adam at a constant rate
until they freeze, each gate tensor in its own group scaled by its input width.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lcsurgery.macs.dynamic import image_batches
from lcsurgery.surgery.model import GATE_PREFIX, unwrap
from lcsurgery.train.config import FinetuneConfig

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


def auto_gate_lr(steps: int, ramp: float) -> float:
    """Default gate learning rate: 3e-3, raised for short runs so gates can reach their decisions.

    Adam moves a gate logit by about one learning rate per step whatever the penalty strength,
    and gates start one unit above the decision boundary. The MAC target ramps down over the
    first ``ramp`` of training (the gate rate does not decay), so a gate can travel about
    ``ramp * steps * lr`` in that time: ``2 / (ramp * steps)`` allows two units.
    """
    return max(3e-3, 2.0 / max(ramp * steps, 1))


def make_optimizer(model: nn.Module, cfg: FinetuneConfig, steps: int, paces: dict[int, float] | None = None) -> torch.optim.Optimizer:
    """SGD (Nesterov) for the backbone; the gates in the same SGD or, by default, in Adam.

    Adam normalises each gate's step: under SGD an L-gate, one scalar that carries a whole
    block's MACs, gets C times the push of any one of the block's C channel gates, reaches
    zero first, and retrofitting degenerates into skipping whole blocks for every input.
    ``paces`` (``static_paces``) speeds up the biases of static gates.
    """
    if not cfg.gated:
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    gate_lr = cfg.gate_lr if cfg.gate_lr is not None else auto_gate_lr(steps, cfg.budget_ramp)
    backbone, gates = param_groups(model, cfg.lr, gate_lr, cfg.weight_decay)
    if cfg.gate_optimizer == "sgd":
        return torch.optim.SGD([backbone, gates], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return _SgdAdam(backbone, _width_scaled(gates, paces), cfg.momentum)


@torch.no_grad()
def static_paces(model: nn.Module, images: torch.Tensor | Iterable) -> dict[int, float]:
    """Per bias of a bias-only (static) gate, by ``id``: how many times further a gate that reads
    the image moves its logit in one Adam step, 1 + the width-scaled L1 norm of the block's mean
    pooled input on the first batch of ``images`` (a tensor or a loader; drawn only where a block
    has static gates) in training mode (``_width_scaled``; the model is left as it was).

    Adam moves each weight by about one rate per step, so a gate reading the image moves its logit
    by the rate times its input's L1 norm (7 to 27 on the pretrained CIFAR ResNet-20), and a bias
    alone by the rate: at one rate, static gates lag the penalty, the controller winds up while
    their cost stays at dense, and then they close together, far under the budget. At this pace
    they travel as image-reading gates do.
    """
    lc = unwrap(model)
    blocks = [b for b in lc.lc_blocks() if b.static_nets()]
    if not blocks:
        return {}
    norms: dict[str, float] = {}

    def pool(block: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        dims = (2, 3) if block.channel_dim == 1 else (1, 2)
        pooled = x.float().mean(dims).mean(0)
        norms[block.name] = float(pooled.abs().sum()) * min(1.0, REFERENCE_WIDTH / pooled.numel())

    x, _ = next(image_batches(images, 256, caller="static_paces")[0])
    hooks = [b.register_forward_pre_hook(pool) for b in blocks]
    buffers = {k: v.clone() for k, v in lc.named_buffers()}  # what training mode would update (BatchNorm statistics)
    was_training = lc.training
    try:
        lc.train()  # the features the gates see in training
        lc(x.to(next(lc.parameters()).device))
    finally:
        lc.train(was_training)
        for k, v in lc.named_buffers():
            v.copy_(buffers[k])
        for h in hooks:
            h.remove()
    return {id(lin.bias): 1.0 + norms[b.name] for b in blocks for lin in b.static_nets()}


REFERENCE_WIDTH = 64  # gate input width where the Adam defaults were tuned (ResNet-20's widest block)


def _width_scaled(gates: dict, paces: dict[int, float] | None = None) -> list[dict]:
    """One Adam group per gate tensor, weights of wide gates at ``lr * REFERENCE_WIDTH / width``,
    the biases of static gates at ``lr`` times their pace (``static_paces``).

    Adam moves every weight by about ``lr`` per step, so a gate logit moves by about ``lr`` times
    the L1 norm of its pooled input, which grows with the input width: unscaled, the 2048-wide
    gates of a ResNet-50 would close within a few steps. Scaling by width makes a wide gate move
    at a narrow one's pace.
    """
    groups = []
    for p in gates["params"]:
        scale = min(1.0, REFERENCE_WIDTH / p.shape[1]) if p.dim() == 2 else (paces or {}).get(id(p), 1.0)
        groups.append({**gates, "params": [p], "lr": gates["lr"] * scale})
    return groups


class _SgdAdam(torch.optim.Optimizer):
    """One optimiser object (one scheduler, one state dict) stepping the backbone with SGD and the gates with Adam."""

    def __init__(self, backbone: dict, gates: list[dict], momentum: float) -> None:
        self.sgd = torch.optim.SGD([backbone], lr=backbone["lr"], momentum=momentum, nesterov=True)
        self.adam = torch.optim.Adam(gates, lr=gates[0]["lr"])
        super().__init__(self.sgd.param_groups + self.adam.param_groups, {})

    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        self.sgd.step()
        self.adam.step()

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        self.adam.load_state_dict(state["adam"])
        self.param_groups = self.sgd.param_groups + self.adam.param_groups  # loading replaced the group dicts


def make_scheduler(opt: torch.optim.Optimizer, steps: int, freeze_gates: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay for the backbone; the gates keep their learning rate until ``freeze_gates``
    (a share of training; None: to the last step), then stop.

    Adam moves a gate by about one learning rate per step whatever the penalty strength, so
    under a decayed rate the gates would freeze early and the budget controller lose its grip.
    Hence a constant rate, then a clean stop, after which the backbone trains against a fixed
    gate function (docs/training.md says what that is worth).
    """
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))  # noqa: E731
    stop = math.inf if freeze_gates is None else freeze_gates * steps
    gates = lambda step: 1.0 if step < stop else 0.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, [gates if g.get("name") == "gates" else cosine for g in opt.param_groups])
