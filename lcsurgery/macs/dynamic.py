"""Per-image MACs from the hard gate decisions: ``count_macs`` over data, ``last_macs`` of a forward.

A block whose L-Net says 0 costs its shortcut and its gate only. A kept block with k of C
active gated channels pays its fixed part plus k times its per-channel part (the first conv's
filters in sequential placement, per-channel ops, the next conv's input side). Gates are always
paid. Static parts come from fvcore (``lcsurgery.macs.static``), counted once per input size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.report import GateUsage, MacReport, build_report, per_sample_macs
from lcsurgery.macs.static import static_costs
from lcsurgery.surgery.model import LCModel, check_placement, unwrap


def _decisions(lc: LCModel) -> tuple[Tensor, Tensor]:
    """Hard decisions of the latest forward: keep bool [B, blocks] and active counts int [B, blocks]."""
    keeps, actives = [], []
    for b in lc.lc_blocks():
        if b.last is None:
            raise LCSurgeryError("the model has not run a forward pass yet: call it on a batch first")
        keeps.append(b.last.keep())
        act = b.last.active()
        actives.append(act.sum(1) if act is not None else torch.zeros_like(keeps[-1], dtype=torch.long))
    return torch.stack(keeps, 1), torch.stack(actives, 1)


def last_macs(model: nn.Module, placement: str | None = None, counting: str = "conv_fc") -> Tensor:
    """int64 [B]: the MACs each image of the latest forward needs under hard gates.

    No second forward: it reads the gate logits recorded by that forward. In training mode
    these are the decisions eval would take for the same gate logits (a gate is on when its
    logit is positive), which is what a MAC budget should control.
    """
    lc = unwrap(model)
    size = lc.__dict__.get("lc_last_input_size")
    if size is None:
        raise LCSurgeryError("the model has not run a forward pass yet: call it on a batch first")
    keep, active = _decisions(lc)
    return per_sample_macs(static_costs(lc, size, counting), keep, active, placement or lc.placement)


def image_batches(images: Tensor | Iterable, batch_size: int, caller: str = "count_macs") -> tuple[Iterator[tuple[Tensor, Tensor | None]], int | None]:
    """``(images, labels or None)`` batches from a tensor of images (cut into ``batch_size``) or a
    loader of image tensors or ``(images, labels)`` pairs, and how many batches if known; anything
    else is refused in ``caller``'s name."""
    if isinstance(images, Tensor):
        n = (len(images) + batch_size - 1) // batch_size
        return ((images[i : i + batch_size], None) for i in range(0, len(images), batch_size)), n

    def gen() -> Iterator[tuple[Tensor, Tensor | None]]:
        for item in images:
            if isinstance(item, Tensor):
                yield item, None
            elif isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
                yield item[0], item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
            else:
                raise LCSurgeryError(f"{caller} expects image tensors or (images, labels) batches, got {type(item).__name__}")

    return gen(), (len(images) if hasattr(images, "__len__") else None)


def _check_images(x: Tensor, lc: LCModel, size: tuple | None) -> None:
    if x.dim() != 4:
        raise LCSurgeryError(f"expected images of shape [batch, channels, height, width], got a {x.dim()}-D tensor of shape {tuple(x.shape)}")
    channels = lc.lc_config.get("input_size", (x.shape[1],))[0]
    if x.shape[1] != channels:
        raise LCSurgeryError(f"the model takes {channels}-channel images, got {x.shape[1]} channels (shape {tuple(x.shape)})")
    if size is not None and tuple(x.shape[1:]) != size:
        raise LCSurgeryError(f"all images must have one size to be counted together: got {tuple(x.shape[1:])} after {size}")


def count_macs(
    model: nn.Module,
    images: Tensor | Iterable,
    placement: str | None = None,
    *,
    counting: str = "conv_fc",
    batch_size: int = 128,
    keep_masks: bool = False,
    progress: bool | None = None,
) -> MacReport:
    """Exact MACs per image of a converted model in eval mode (hard gates).

    ``images``: a tensor [N, C, H, W] or an iterable of batches (tensors or (images, labels)).
    ``placement``: the schedule to account for (default: the model's own); the gates, hence the
    outputs, are the same for both. ``keep_masks`` keeps each image's active-channel masks.
    """
    lc = unwrap(model)
    if lc.training:
        raise LCSurgeryError(
            "count_macs needs the model in eval mode (call model.eval()): in training the gates are soft, "
            "so no gate is exactly 0 and nothing would be skipped. For the hard decisions of a training "
            "batch, use lcsurgery.last_macs(model) after its forward pass."
        )
    placement = placement or lc.placement
    check_placement(placement)
    batches, n_batches = image_batches(images, batch_size)
    show = progress if progress is not None else (n_batches is None or n_batches > 4)
    keeps, actives, labels, preds, masks = [], [], [], [], {b.name: [] for b in lc.lc_blocks()} if keep_masks else None
    tally = _Tally(lc)
    size = None
    device = next(lc.parameters()).device
    with torch.no_grad():
        for x, y in tqdm(batches, total=n_batches, desc="counting MACs", disable=not show, leave=False):
            _check_images(x, lc, size)
            size = tuple(x.shape[1:])
            out = lc(x.to(device))
            keep, active = _decisions(lc)
            tally.add(lc)
            keeps.append(keep.cpu())
            actives.append(active.cpu())
            if y is not None:
                labels.append(y.cpu())
            if isinstance(out, Tensor) and out.dim() == 2:
                preds.append(out.argmax(1).cpu())
            if masks is not None:
                for b in lc.lc_blocks():
                    if b.last.active() is not None:
                        masks[b.name].append(b.last.active().cpu())
    if size is None:
        raise LCSurgeryError("count_macs got no images")
    return build_report(
        static_costs(lc, size, counting),
        torch.cat(keeps),
        torch.cat(actives),
        placement,
        labels=torch.cat(labels) if labels and len(labels) == len(keeps) else None,
        predictions=torch.cat(preds) if preds and len(preds) == len(keeps) else None,
        masks={k: torch.cat(v) for k, v in masks.items() if v} if masks is not None else None,
        usage=tally.usage(),
    )


class _Tally:
    """Running counts of how often each gate is on, and each image's pattern fingerprint (a sum of
    random 64-bit weights over its on gates, wrapping), so no per-image mask is kept."""

    def __init__(self, lc: LCModel) -> None:
        gen = torch.Generator().manual_seed(20071515)
        self.blocks = list(lc.lc_blocks())
        self.weights = {b.name: torch.randint(-(2**62), 2**62, (1 + b.gated_channels,), generator=gen) for b in self.blocks}
        self.layer_on = {b.name: 0 for b in self.blocks if b.l_net is not None}
        self.channel_on = {b.name: torch.zeros(b.gated_channels, dtype=torch.int64) for b in self.blocks if b.c_net is not None}
        self.patterns: list[Tensor] = []
        self.images = 0

    def add(self, lc: LCModel) -> None:
        pattern = None
        for b in self.blocks:
            keep = b.last.keep().cpu()
            active = b.last.active()
            on = keep[:, None] if active is None else torch.cat([keep[:, None], active.cpu() & keep[:, None]], 1)
            w = self.weights[b.name][: on.shape[1]]
            part = (on.long() * w).sum(1)
            pattern = part if pattern is None else pattern + part
            if b.name in self.layer_on:
                self.layer_on[b.name] += int(keep.sum())
            if b.name in self.channel_on:
                self.channel_on[b.name] += on[:, 1:].long().sum(0)
        self.patterns.append(pattern)
        self.images += len(pattern)

    def usage(self) -> GateUsage:
        return GateUsage(self.images, dict(self.layer_on), dict(self.channel_on), torch.cat(self.patterns) if self.patterns else torch.zeros(0, dtype=torch.int64))
