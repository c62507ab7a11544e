"""Distillation from a frozen dense model (Hinton et al. 2015): the teacher and the loss term."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.models.factory import create_model
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.train.config import FinetuneConfig


def build_teacher(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The frozen dense model to distil from, in eval mode.

    ``"start"`` is the original model with the weights the run starts from (``--checkpoint``
    or ``--pretrained``): the gated model learns to keep what it had. A path names a weights
    file, or a run folder (its ``model.pt``), of a dense model of the same ``--model`` spec,
    such as the dense fine-tune of a trade-off benchmark.
    """
    model = create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained and cfg.teacher == "start")
    source = cfg.checkpoint if cfg.teacher == "start" else cfg.teacher
    if source is not None:
        path = Path(source)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise LCSurgeryError(f"--teacher {cfg.teacher}: no weights at {path} (give a weights file, a finished run folder, or 'start')")
        result = load_weights(model, path, reinit_head=cfg.teacher == "start")
        if result.reinitialised:
            raise LCSurgeryError(f"--teacher {cfg.teacher}: its classifier does not fit {num_classes} classes; distil from a model trained on this data")
    elif not cfg.pretrained:
        raise LCSurgeryError("--teacher start needs starting weights (--checkpoint or --pretrained): a random teacher teaches nothing")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term: KL(teacher || student) at a temperature, scaled by its square
    so that its gradients keep their size as the temperature changes."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True) * t * t
