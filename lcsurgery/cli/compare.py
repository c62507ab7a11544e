"""Compare placements of one fine-tuned model: dense vs LC-Net parallel vs sequential (paper Table 1).

Accuracy, mean MACs per image, MAC reduction and CPU latency at batch 1 and 64, in one run.
With ``--exits``, a row for the same network with its early exits at a MAC budget. Writes
compare.json and compare.md into the run folder.

  lcsurgery compare runs/r20-seq50 --dense-run runs/r20-dense
  lcsurgery compare runs/r20-seq50 --dense-run runs/r20-dense --exits runs/exits/seq50 --exit-budget 0.35
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcsurgery.bench.compare import compare


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of commands that evaluate a finished run folder."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("run", help="a lcsurgery finetune run folder (with model.pt)")
    p.add_argument("--data", help="test data (default: the run's)")
    p.add_argument("--test-subset", type=int, default=2000, help="test images to evaluate (class-balanced); 0 for all")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--dense-run", help="a dense fine-tune run folder for the dense row (default: the run's starting weights)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=100, help="timed rounds at batch 1 (a fifth of that at larger batches)")
    p.add_argument("--exits", help="an exits run on RUN's network (lcsurgery exits train --run RUN): a row with its early exits")
    p.add_argument("--exit-budget", type=float, default=0.4, help="the exits row's MAC budget, a fraction of the dense MACs")


def run(args: argparse.Namespace) -> int:
    compare(
        Path(args.run), args.data, Path(args.dense_run) if args.dense_run else None, args.test_subset or None,
        tuple(args.batches), args.threads, args.rounds, Path(args.exits) if args.exits else None, args.exit_budget,
    )  # fmt: skip
    return 0
