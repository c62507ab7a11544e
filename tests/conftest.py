from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared() -> Path:
    """``../shared`` beside the project root (real data and checkpoints); skip where absent."""
    if not (SHARED / "models" / "cifar10-resnet20.th").exists():
        pytest.skip("../shared is absent: real CIFAR-10 data and the pretrained ResNet-20 live there")
    return SHARED
