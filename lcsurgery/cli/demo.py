"""The main job on a built-in default: retrofit a pretrained ResNet-20, fine-tune, compare, plot.

Offline by default: the built-in shapes task (generated on the fly) and a ResNet-20 this
project trained on it and ships. The demo fine-tunes a dense baseline and LC-Net at one MAC
budget for each placement, prints the accuracy-MACs table and the placement comparison
(paper Table 1, with CPU latency), and writes the figures. About 5 minutes on 2 CPU cores.

  lcsurgery demo
  lcsurgery demo --data ../shared/data/cifar10-jpg.tar.gz --checkpoint ../shared/models/cifar10-resnet20.th
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import lcsurgery
from lcsurgery.assets import SHAPES_RESNET20
from lcsurgery.bench import tradeoff
from lcsurgery.bench.compare import compare
from lcsurgery.cli.figures import make_figures
from lcsurgery.errors import LCSurgeryError
from lcsurgery.models.factory import create_model
from lcsurgery.train.config import FinetuneConfig

DEFAULT_DATA = "synthetic:6000"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--data", default=DEFAULT_DATA, help="synthetic[:n_train] (built in), a .tar.gz ImageFolder, an ImageFolder tree or cifar10:<dir>")
    p.add_argument("--checkpoint", help="pretrained cifar:resnet20 weights (default on the built-in task: the shipped ones)")
    p.add_argument("--budget", type=float, default=0.5, help="MAC budget of the LC-Net runs, a fraction of dense in (0, 1]")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--train-subset", type=int, help="training images to use (class-balanced; default: all)")
    p.add_argument("--test-subset", type=int, default=1000, help="test images to evaluate (class-balanced)")
    p.add_argument("--rounds", type=int, default=100, help="timed rounds for the latency columns")
    p.add_argument("--out", default="runs/demo", help="folder for the runs, tables and figures")
    p.add_argument("--force", action="store_true", help="start over instead of reusing finished runs in --out")


def _checkpoint(args: argparse.Namespace) -> str | None:
    if args.checkpoint:
        return args.checkpoint
    if args.data.split(":")[0] == "synthetic":
        if not SHAPES_RESNET20.exists():
            raise LCSurgeryError(f"the shipped checkpoint {SHAPES_RESNET20} is missing: reinstall lcsurgery")
        return str(SHAPES_RESNET20)
    print("warning: no --checkpoint for real data: the ResNet-20 starts from random weights, so the demo shows retrofitting nothing", file=sys.stderr)
    return None


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.force and out.exists():
        shutil.rmtree(out)
    base = FinetuneConfig(
        model="cifar:resnet20", data=args.data, checkpoint=_checkpoint(args), epochs=args.epochs, batch_size=args.batch_size,
        train_subset=args.train_subset, test_subset=args.test_subset, out=str(out),
    )  # fmt: skip
    print(lcsurgery.find_blocks(create_model(base.model), input_size=(3, 32, 32)))
    print(f"\n== 1/3 fine-tuning: dense, and LC-Net at {args.budget:.0%} of the dense MACs for each placement ({args.epochs} epochs each)")
    tradeoff.run(base, [args.budget], out)
    seq = out / f"sequential-{round(100 * args.budget)}"
    print("\n== 2/3 one set of gates, two schedules: dense vs LC-Net parallel vs sequential")
    compare(seq, dense_run=out / "dense", test_subset=args.test_subset, rounds=args.rounds)
    print("\n== 3/3 figures")
    for path in make_figures(seq, None, args.test_subset, out / "figures", out):
        print(f"  {path}")
    print(f"\ntables: {out / 'results.md'}, {seq / 'compare.md'}")
    return 0
