"""The model zoo every surgery test runs over, with each architecture's true residual block count."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import timm
import torch
import torchvision
from torch import nn

from lcsurgery.models.cifar_resnet import resnet20


@dataclass(frozen=True)
class ZooModel:
    name: str
    factory: Callable[[], nn.Module]
    blocks: int  # residual blocks the architecture really has
    size: int  # small input resolution used in tests


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)()


def _timm(name: str) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False)


ZOO = [
    ZooModel("tv.resnet18", _tv("resnet18"), 8, 64),
    ZooModel("tv.resnet34", _tv("resnet34"), 16, 64),
    ZooModel("tv.resnet50", _tv("resnet50"), 16, 64),
    ZooModel("tv.resnet101", _tv("resnet101"), 33, 64),
    ZooModel("tv.resnet152", _tv("resnet152"), 50, 64),
    ZooModel("tv.resnext50_32x4d", _tv("resnext50_32x4d"), 16, 64),
    ZooModel("tv.wide_resnet50_2", _tv("wide_resnet50_2"), 16, 64),
    ZooModel("tv.mobilenet_v2", _tv("mobilenet_v2"), 10, 64),
    ZooModel("tv.mobilenet_v3_large", _tv("mobilenet_v3_large"), 10, 64),
    ZooModel("tv.regnet_y_400mf", _tv("regnet_y_400mf"), 16, 64),
    ZooModel("tv.efficientnet_b0", _tv("efficientnet_b0"), 9, 64),
    ZooModel("tv.convnext_tiny", _tv("convnext_tiny"), 18, 64),
    ZooModel("timm.resnet50", _timm("resnet50"), 16, 64),
    ZooModel("timm.resnet50d", _timm("resnet50d"), 16, 64),
    ZooModel("timm.seresnext26d_32x4d", _timm("seresnext26d_32x4d"), 8, 64),
    ZooModel("timm.efficientnet_b0", _timm("efficientnet_b0"), 9, 64),
    ZooModel("timm.regnety_008", _timm("regnety_008"), 14, 64),
    ZooModel("timm.mobilenetv3_large_100", _timm("mobilenetv3_large_100"), 10, 64),
    ZooModel("timm.convnext_tiny", _timm("convnext_tiny"), 18, 64),
    ZooModel("cifar.resnet20", resnet20, 9, 32),
]
ZOO_BY_NAME = {z.name: z for z in ZOO}


@cache
def original(name: str) -> nn.Module:
    """A randomly initialised model of the zoo with non-trivial BatchNorm statistics, in eval mode.

    Freshly initialised BN layers are identities (mean 0, var 1, weight 1, bias 0); random
    statistics make folding and channel slicing errors visible.
    """
    torch.manual_seed(0)
    model = ZOO_BY_NAME[name].factory()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    return model.eval()


def example(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    size = ZOO_BY_NAME[name].size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def randomize_gates(model: nn.Module, seed: int = 0, scale: float = 2.0) -> None:
    """Input-dependent random gates: roughly half the blocks and channels on, varying per image.

    The gates' input statistics are random too, so that every comparison of two executions
    also checks how each one applies them (the engine folds them into the gate weights)."""
    import lcsurgery

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blk in lcsurgery.gated_blocks(model):
            blk.input_mean.copy_(torch.randn(blk.input_mean.shape, generator=g) * 0.2)
            blk.input_scale.copy_((torch.randn(blk.input_scale.shape, generator=g) * 0.25).exp())
            for lin in (blk.l_net, blk.c_net):
                if lin is not None:
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * scale / lin.in_features**0.5)
                    lin.bias.copy_(torch.randn(lin.bias.shape, generator=g) * 0.5)
