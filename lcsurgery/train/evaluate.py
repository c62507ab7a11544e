"""Evaluation in eval mode with hard gates, and the cost gap the budget controller calibrates on."""

from __future__ import annotations

import math

import torch
from torch import nn

from lcsurgery.data.loaders import Loaders
from lcsurgery.macs.dynamic import count_macs, last_macs
from lcsurgery.macs.static import fvcore_macs, static_costs
from lcsurgery.surgery.convert import gated_blocks

CALIBRATION_IMAGES = 1024  # training images per side of the budget controller's eval/training cost gap


@torch.no_grad()
def evaluate(model: nn.Module, loaders: Loaders, placement: str, dense: bool, reference_macs: int | None = None) -> dict:
    """Eval-mode accuracy and MACs per image (hard gates), for both placements when gated, with how
    much the computation varies between images. A plain model (``dense``) is counted by fvcore;
    ``reference_macs``, the original's count when the model was pruned, is then its dense cost."""
    model.eval()
    if dense:
        device = device_of(model)
        correct = total = 0
        for x, y in loaders.test:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
        macs = fvcore_macs(model, (torch.zeros(1, *x.shape[1:], device=device),))
        reference = reference_macs or macs
        return {"val_accuracy": correct / total, "mean_macs": macs, "dense_macs": reference, "mac_fraction": macs / reference}
    report = count_macs(model, loaders.test, placement, progress=False)
    other = report.with_placement("sequential" if placement == "parallel" else "parallel")
    return {
        "val_accuracy": report.accuracy,
        "mean_macs": report.mean,
        "dense_macs": report.dense,
        "mac_fraction": report.ratio,
        "mean_macs_by_placement": {placement: report.mean, other.placement: other.mean},
        "skip_rates": {n: round(b.skip_rate, 4) for n, b in report.by_block.items()},
        # null, not NaN, for blocks without a C-Net or never run: NaN is not JSON (jq and browsers reject it)
        "active_fraction": {n: None if math.isnan(b.active_fraction) else round(b.active_fraction, 4) for n, b in report.by_block.items()},
        "dynamics": _rounded(report.dynamics()),
    }


def _rounded(value):
    """Floats to 4 decimals, in nested dicts too (log lines stay short)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


@torch.no_grad()
def cost_gap(model: nn.Module, loaders: Loaders, placement: str) -> tuple[float, float]:
    """The MAC fraction eval pays and the one training batches report, for the model as it is now.

    Eval: eval mode on un-augmented training images (the test set never steers training).
    Training: training mode (BatchNorm on batch statistics, running statistics left untouched,
    the current gate noise) on augmented training batches. Measuring both on one model state
    keeps the budget controller's offset free of the batch-to-batch swings of its running average.
    """
    device = device_of(model)
    model.eval()
    plain = first_images(loaders.calibration, device)
    eval_fraction = count_macs(model, plain, placement, progress=False).ratio
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    blocks = gated_blocks(model)
    momenta = [b.stats_momentum for b in blocks]
    for b in blocks:
        b.stats_momentum = 0.0  # the gates' input statistics, likewise
    model.train()
    macs = []
    try:
        for x in first_images(loaders.train, device):
            model(x)
            macs.append(last_macs(model, placement).double())
    finally:
        for b, momentum in zip(blocks, momenta):
            b.stats_momentum = momentum
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    dense = static_costs(model, tuple(plain[0].shape[1:])).dense
    return eval_fraction, float(torch.cat(macs).mean()) / dense


def first_images(loader, device: torch.device) -> list[torch.Tensor]:
    images = []
    for x, _ in loader:
        images.append(x.to(device))
        if sum(map(len, images)) >= CALIBRATION_IMAGES:
            break
    return images


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
