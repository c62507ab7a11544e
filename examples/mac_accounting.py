"""Exact dynamic MAC accounting on the CIFAR ResNet-20 with forced gates.

Loads the pretrained ResNet-20 (``--checkpoint``, default ``../shared/models/cifar10-resnet20.th``),
converts it, forces the gates to skip 4 of the 9 blocks and keep half the channels of the
rest, and prints ``count_macs`` summaries for both placements on CIFAR-10 (JPEG) test images
(``--data``), or on the built-in synthetic images where that data is absent.

    python examples/mac_accounting.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import lcsurgery
from lcsurgery.data.loaders import make_loaders
from lcsurgery.models.cifar_resnet import resnet20

SHARED = Path(__file__).resolve().parents[2] / "shared"
SKIPPED = ("layer1.1", "layer1.2", "layer2.2", "layer3.2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(SHARED / "models" / "cifar10-resnet20.th"))
    parser.add_argument("--data", default=str(SHARED / "data" / "cifar10-jpg.tar.gz"))
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()

    model = resnet20()
    if Path(args.checkpoint).exists():
        lcsurgery.load_weights(model, args.checkpoint)
    else:
        print(f"no checkpoint at {args.checkpoint}: random weights (MACs do not depend on them)")
    data = args.data if Path(args.data).exists() else "synthetic"
    lc = lcsurgery.convert(model, placement="sequential").eval()
    for blk in lcsurgery.gated_blocks(lc):
        blk.force(keep=blk.name not in SKIPPED, channels=torch.arange(blk.gated_channels) < blk.gated_channels // 2)
    test = make_loaders(data, lc, 500, test_subset=args.images).test
    for placement in ("sequential", "parallel"):
        report = lcsurgery.count_macs(lc, test, placement)
        correct = sum(int((lc(x).argmax(1) == y).sum()) for x, y in test) if placement == "sequential" else None
        print(report.summary())
        if correct is not None:
            print(f"accuracy with these forced gates (no fine-tuning): {correct / len(report.per_sample):.3f}")
        print()


if __name__ == "__main__":
    with torch.no_grad():
        main()
