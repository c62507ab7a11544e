"""The model a run fine-tunes: created from its spec, converted unless dense, weights loaded."""

from __future__ import annotations

import torch
from torch import nn

from lcsurgery.baselines.torch_pruning import apply_structure, prune_to_budget
from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.static import fvcore_macs
from lcsurgery.models.factory import create_model
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.surgery.convert import convert
from lcsurgery.train.config import FinetuneConfig


def build_model(cfg: FinetuneConfig, num_classes: int, structure: dict[str, int] | None = None) -> nn.Module:
    """The model to fine-tune: created from its spec, converted unless dense or pruned, checkpoint
    loaded. A pruned run's model is pruned to the budget after loading, or, given the ``structure``
    a pruned run saved, cut to that shape so its weights load."""
    try:
        model = create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained)
    except (RuntimeError, OSError) as exc:
        if not cfg.pretrained:
            raise
        raise LCSurgeryError(f"could not fetch pretrained weights for {cfg.model} ({exc}); pass --checkpoint instead") from exc
    size = cfg.size or _native_size(model)
    if cfg.prune is not None and structure is not None:
        apply_structure(model, structure, (3, size, size))
    if cfg.gated:
        layers, channels = "layer" in cfg.gates, "channel" in cfg.gates
        static = True if cfg.static else "channels" if cfg.static_channels else False
        model = convert(model, cfg.placement, layers=layers, channels=channels, slope=cfg.slope, input_size=(3, size, size), static=static)
    if cfg.checkpoint:
        result = load_weights(model, cfg.checkpoint, reinit_head=True)
        if result.reinitialised:
            print(f"note: {', '.join(result.reinitialised)} re-initialised for {num_classes} classes")
    if cfg.prune is not None and structure is None:
        model, structure = prune_to_budget(model, cfg.budget, (3, size, size))
    if cfg.prune is not None:
        model.lc_pruned = {"structure": structure, "reference_macs": fvcore_macs(create_model(cfg.model, num_classes=num_classes).eval(), (torch.zeros(1, 3, size, size),))}
    return model


def _native_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if hasattr(model, "default_input_size"):
        return model.default_input_size[-1]
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return 224
