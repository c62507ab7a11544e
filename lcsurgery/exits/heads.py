"""``ExitHead``: the classifier an early exit runs on a feature map (Shallow-Deep Networks' head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ExitHead(nn.Module):
    """Pool the feature map to ``pool`` x ``pool`` with a learned mix of max and average pooling,
    then one linear layer: SDN's internal classifier (Kaya et al., 2019), cheap next to any block
    (``in_channels * pool**2 * num_classes`` MACs). ``hidden`` > 0 puts a hidden layer of that
    width (and a ReLU) before the classifier, for early feature maps a linear layer cannot read."""

    def __init__(self, in_channels: int, num_classes: int, pool: int = 4, hidden: int = 0) -> None:
        super().__init__()
        self.pool = pool
        self.mix = nn.Parameter(torch.zeros(()))  # sigmoid(mix): the share of max pooling
        features = in_channels * pool * pool
        self.hidden = nn.Sequential(nn.Linear(features, hidden), nn.ReLU()) if hidden else None
        self.fc = nn.Linear(hidden or features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.pool or w % self.pool:
            avg, top = F.adaptive_avg_pool2d(x, self.pool), F.adaptive_max_pool2d(x, self.pool)
        else:  # equal bins: the same numbers as the adaptive kernels, in half their time at batch 1
            k = (h // self.pool, w // self.pool)
            avg, top = F.avg_pool2d(x, k), F.max_pool2d(x, k)
        pooled = torch.lerp(avg, top, torch.sigmoid(self.mix)).flatten(1)
        if self.hidden is not None:
            pooled = self.hidden(pooled)
        return F.linear(pooled, self.fc.weight, self.fc.bias)
