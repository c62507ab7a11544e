"""``ArrayDataset``: a small-image dataset decoded into memory as uint8 tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ArrayDataset:
    """Decoded images: uint8 [N, 3, H, W], labels int64 [N], class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None) -> ArrayDataset:
        """The first ``n`` images of every class in turn (a balanced prefix), or all."""
        if n is None or n >= len(self):
            return self
        order = torch.argsort(_rank_within_class(self.labels), stable=True)[:n]
        return ArrayDataset(self.images[order], self.labels[order], self.classes)

    def split(self, held_out: int) -> tuple[ArrayDataset, ArrayDataset]:
        """(the rest, ``held_out`` images): the held-out part balanced over classes (the last
        images of each class), for tuning on training images the model did not train on."""
        if not 0 < held_out < len(self):
            raise ValueError(f"held_out must be between 0 and {len(self)} images, got {held_out}")
        rank = _rank_within_class(self.labels)
        counts = torch.bincount(self.labels)[self.labels]
        held = rank >= counts - math.ceil(held_out / len(self.classes))
        held_idx = held.nonzero().squeeze(1)[:held_out]
        mask = torch.zeros(len(self), dtype=torch.bool)
        mask[held_idx] = True
        return self._take(~mask), self._take(mask)

    def _take(self, mask: torch.Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[mask], self.labels[mask], self.classes)


def _rank_within_class(labels: Tensor) -> Tensor:
    rank = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    return rank
