"""The shared pretrained CIFAR ResNet-20 (skipped where ../shared is absent)."""

from __future__ import annotations

import torch

import lcsurgery
from lcsurgery.models.cifar_resnet import resnet20


def test_pretrained_resnet20_converts_exactly(shared):
    model = resnet20().eval()
    result = lcsurgery.load_weights(model, shared / "models" / "cifar10-resnet20.th")
    assert result.missing_gates == []
    lc = lcsurgery.convert(model, placement="sequential").eval()
    assert len(lcsurgery.gated_blocks(lc)) == 9
    fresh = lcsurgery.convert(resnet20(), placement="sequential").eval()
    assert len(lcsurgery.load_weights(fresh, shared / "models" / "cifar10-resnet20.th").missing_gates) == 9 * 7  # per block: two gate layers (weight, bias) and three input statistics
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        for converted in (lc, fresh):
            assert (converted(x) - ref).abs().max() <= 1e-5 * ref.abs().max()
