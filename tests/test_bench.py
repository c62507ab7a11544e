"""Benchmark plumbing that can be checked without timing anything."""

from __future__ import annotations

import pytest
import torchvision

from lcsurgery.bench.kernels import ConvShape, conv_shapes
from lcsurgery.models.factory import create_model


def test_conv_shapes_of_resnet20_are_its_six_distinct_convs():
    shapes = conv_shapes(create_model("cifar:resnet20"), (3, 32, 32))
    k3, s1, s2, p1 = (3, 3), (1, 1), (2, 2), (1, 1)
    assert {s: len(names) for s, names in shapes.items()} == {
        ConvShape(3, 16, k3, s1, p1, 32, 32): 1,
        ConvShape(16, 16, k3, s1, p1, 32, 32): 6,
        ConvShape(16, 32, k3, s2, p1, 32, 32): 1,
        ConvShape(32, 32, k3, s1, p1, 16, 16): 5,
        ConvShape(32, 64, k3, s2, p1, 16, 16): 1,
        ConvShape(64, 64, k3, s1, p1, 8, 8): 5,
    }
    assert shapes[ConvShape(16, 32, k3, s2, p1, 32, 32)] == ["layer2.0.conv1"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_conv_shapes_cover_every_conv_once(name):
    model = getattr(torchvision.models, name)()
    shapes = conv_shapes(model, (3, 64, 64))
    names = [n for convs in shapes.values() for n in convs]
    assert sorted(names) == sorted(n for n, m in model.named_modules() if m.__class__.__name__ == "Conv2d")
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed
