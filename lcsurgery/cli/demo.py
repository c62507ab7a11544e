"""The main job on a built-in default: retrofit a pretrained ResNet-20, fine-tune, compare, plot.

Offline by default: the built-in shapes task (generated on the fly) and a ResNet-20 this
project trained on it and ships. The demo fine-tunes a dense baseline, LC-Net's gates made
static and LC-Net at one MAC budget for each placement, trains early exits on the sequential
run's network, prints the accuracy-MACs table and the placement comparison (paper Table 1, with
CPU latency, and a row with the exits at 0.8 of the budget), and writes the figures (with the
exits: where each class leaves, the easiest and hardest images, and the channels each class
computed up to its exits): a few minutes on 2 CPU cores.

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
from lcsurgery.cli import exits
from lcsurgery.cli.figures import make_figures
from lcsurgery.data.sources import load_arrays
from lcsurgery.errors import LCSurgeryError
from lcsurgery.models.factory import create_model
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.exits import ExitsConfig, train_exits

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
    print(f"\n== 1/4 fine-tuning: dense, and LC-Net at {args.budget:.0%} of the dense MACs for each placement ({args.epochs} epochs each)")
    tradeoff.run(base, [args.budget], out)
    seq = out / f"sequential-{round(100 * args.budget)}"
    exit_run, exit_budget = out / "exits", round(0.8 * args.budget, 2)
    print(f"\n== 2/4 early exits on {seq.name}'s network (heads trained, network frozen), and a budget set at inference")
    if not (exit_run / "metrics.json").exists():
        held_out = min(5000, len(load_arrays(args.data, "train")) // 10)
        train_exits(ExitsConfig(model=base.model, data=args.data, run=str(seq), out=str(exit_run), epochs=args.epochs, held_out=held_out, test_subset=args.test_subset, force=True))
    exits.evaluate(exit_run, exit_budget, None, args.test_subset)
    print(f"\n== 3/4 one set of gates, two schedules, and the exits: dense vs LC-Net parallel vs sequential vs sequential with exits at {exit_budget:.0%}")
    compare(seq, dense_run=out / "dense", test_subset=args.test_subset, rounds=args.rounds, exits=exit_run, exit_budget=exit_budget)
    print("\n== 4/4 figures")
    for path in make_figures(seq, None, args.test_subset, out / "figures", out):
        print(f"  {path}")
    exits.figure(exit_run, out, out / "figures" / "exits_sweep.png")
    for name in ("exits_by_class.png", "exits_extremes.png", "exits_channels.png"):
        print(f"  {exit_run / name}")
    print(f"\ntables: {out / 'results.md'}, {seq / 'compare.md'}, {exit_run / 'sweep.md'}")
    return 0
