"""The headline workflow: a pretrained timm ResNet-50, LC-Net gates, fine-tuned under a MAC budget.

With hub access and a GPU (the real run):
  python examples/finetune_timm_resnet50.py --data ../shared/data/cifar10-jpg.tar.gz --size 224 --epochs 5
Offline on a CPU (end to end at low resolution, a few hundred steps):
  python examples/finetune_timm_resnet50.py --data ../shared/data/cifar10-jpg.tar.gz --size 64 \\
      --train-subset 6400 --epochs 1 --batch-size 32 --out runs/timm-r50-cpu
Multi-GPU: torchrun --nproc_per_node 4 -m lcsurgery.cli finetune --model timm:resnet50 --pretrained ...

The same job from the shell: lcsurgery finetune --model timm:resnet50 --pretrained --budget 0.5 ...
"""

from __future__ import annotations

import argparse
import json
import sys

import timm

from lcsurgery.train import FinetuneConfig, finetune


def pretrained_weights_reachable() -> bool:
    """Whether timm can fetch resnet50's pretrained weights (from the hub or its local cache)."""
    try:
        timm.create_model("resnet50", pretrained=True)
    except Exception as exc:  # noqa: BLE001 - any hub, network or cache failure means "not reachable"
        print(f"(pretrained weights not reachable: {type(exc).__name__})", file=sys.stderr)
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="synthetic", help="a .tar.gz ImageFolder, an ImageFolder tree, cifar10:<dir> or synthetic")
    p.add_argument("--checkpoint", help="resnet50 weights to start from when the hub is not reachable")
    p.add_argument("--size", type=int, default=64, help="input resolution (224 for the real run)")
    p.add_argument("--placement", choices=("parallel", "sequential"), default="sequential")
    p.add_argument("--budget", type=float, default=0.5, help="target fraction of the dense MACs")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-3, help="backbone learning rate (the paper's 0.005)")
    p.add_argument("--train-subset", type=int)
    p.add_argument("--test-subset", type=int, default=1000)
    p.add_argument("--amp", action="store_true")
    p.add_argument("--out", default="runs/timm-r50")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()

    pretrained = args.checkpoint is None and pretrained_weights_reachable()
    if args.checkpoint is None and not pretrained:
        bar = "!" * 78
        print(f"{bar}\n!! No pretrained weights: starting from RANDOM weights. This shows the workflow,\n"
              f"!! not retrofitting; pass --checkpoint resnet50.pth (timm or torchvision layout).\n{bar}", file=sys.stderr)  # fmt: skip
    cfg = FinetuneConfig(
        model="timm:resnet50", pretrained=pretrained, checkpoint=args.checkpoint, data=args.data, size=args.size,
        placement=args.placement, budget=args.budget, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        train_subset=args.train_subset, test_subset=args.test_subset, amp=args.amp, out=args.out, force=args.force,
    )  # fmt: skip
    metrics = finetune(cfg)
    keys = ("val_accuracy", "mean_macs", "dense_macs", "mac_fraction", "mean_macs_by_placement", "placement")
    print(json.dumps({k: metrics[k] for k in keys if k in metrics}, indent=2))
    print(f"next: lcsurgery compare {args.out}    and    lcsurgery figures {args.out}")


if __name__ == "__main__":
    main()
