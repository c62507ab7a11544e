"""CIFAR ResNets (He et al. 2016, section 4.2) with the parameter-free "option A" shortcut.

The layout matches the widely used third-party checkpoints (e.g. the ResNet-20 in
``../shared/models``): ``conv1``/``bn1``, three stages of ``BasicBlock``s of widths 16, 32, 64,
and ``linear``. Where a block changes shape its shortcut subsamples every second pixel and
zero-pads the channels, so it has no parameters: a useful test that the surgery handles
shortcuts that are plain functions rather than modules.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

CIFAR_MEAN = (0.485, 0.456, 0.406)
CIFAR_STD = (0.229, 0.224, 0.225)


def option_a_shortcut(x: Tensor, pad: int) -> Tensor:
    """Halve the resolution and zero-pad ``pad`` channels on each side (no parameters)."""
    return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_pad = planes // 4 if (stride != 1 or in_planes != planes) else 0

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = option_a_shortcut(x, self.shortcut_pad) if self.shortcut_pad else x
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 3 stages of ``n`` blocks, widths 16, 32, 64."""

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.in_planes = 16
        self.layer1 = self._stage(16, n, 1)
        self.layer2 = self._stage(32, n, 2)
        self.layer3 = self._stage(64, n, 2)
        self.linear = nn.Linear(64, num_classes)
        self.default_input_size = (3, 32, 32)
        self.mean, self.std = CIFAR_MEAN, CIFAR_STD
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet20(num_classes: int = 10) -> CifarResNet:
    """ResNet-20 for CIFAR: 9 residual blocks, ~41 M MACs per 32x32 image."""
    return CifarResNet(20, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNet:
    """ResNet-56 for CIFAR: 27 residual blocks, ~125 M MACs per 32x32 image."""
    return CifarResNet(56, num_classes)
