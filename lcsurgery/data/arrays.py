"""``ArrayDataset``: a small-image dataset decoded into memory as uint8 tensors."""

from __future__ import annotations

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


def _rank_within_class(labels: Tensor) -> Tensor:
    rank = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().squeeze(1)
        rank[idx] = torch.arange(len(idx))
    return rank
