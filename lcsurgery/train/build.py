"""The model a run fine-tunes: created from its spec, converted unless dense, weights loaded."""

from __future__ import annotations

from torch import nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.models.factory import create_model
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.surgery.convert import convert
from lcsurgery.train.config import FinetuneConfig


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The model to fine-tune: created from its spec, converted unless dense, checkpoint loaded."""
    try:
        model = create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained)
    except (RuntimeError, OSError) as exc:
        if not cfg.pretrained:
            raise
        raise LCSurgeryError(f"could not fetch pretrained weights for {cfg.model} ({exc}); pass --checkpoint instead") from exc
    if not cfg.dense:
        size = cfg.size or _native_size(model)
        layers, channels = "layer" in cfg.gates, "channel" in cfg.gates
        model = convert(model, cfg.placement, layers=layers, channels=channels, slope=cfg.slope, input_size=(3, size, size), static=cfg.static)
    if cfg.checkpoint:
        result = load_weights(model, cfg.checkpoint, reinit_head=True)
        if result.reinitialised:
            print(f"note: {', '.join(result.reinitialised)} re-initialised for {num_classes} classes")
    return model


def _native_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if hasattr(model, "default_input_size"):
        return model.default_input_size[-1]
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return 224
