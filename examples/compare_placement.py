"""Parallel vs sequential placement from Python: one set of trained gates, two schedules.

The gates decide the same things under both placements, so predictions are identical; what
differs is the work. Parallel runs the gates beside each block's first conv (no added
latency), so a kept block pays that conv in full; sequential runs the gates first and trims
the first conv's filters too. ``lcsurgery compare`` wraps the same API in one command.

  lcsurgery demo                     # makes runs/demo (or use any lcsurgery finetune run)
  python examples/compare_placement.py runs/demo/sequential-50 --dense-run runs/demo/dense
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import lcsurgery
from lcsurgery.bench.compare import compare
from lcsurgery.train import load_run
from lcsurgery.data.loaders import make_loaders


def median_ms(model: torch.nn.Module, x: torch.Tensor, rounds: int = 50) -> float:
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(rounds):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a lcsurgery finetune run folder")
    p.add_argument("--dense-run", type=Path, help="a dense fine-tune run folder for the dense row of the table")
    p.add_argument("--test-subset", type=int, default=1000)
    args = p.parse_args()
    torch.set_num_threads(1)

    lc, cfg, _ = load_run(args.run)  # a converted model in eval mode: hard gates, real skipping
    loaders = make_loaders(cfg.data, lc, 250, size=cfg.size, test_subset=args.test_subset)
    seq = lcsurgery.count_macs(lc, loaders.test, placement="sequential")
    par = seq.with_placement("parallel")  # same forward pass and decisions, the other schedule's cost
    print(seq.summary())
    print(f"\nsequential {seq.mean / 1e6:.2f}M vs parallel {par.mean / 1e6:.2f}M MACs per image (dense {seq.dense / 1e6:.2f}M)")

    x = next(iter(loaders.test))[0][:1]
    for placement in ("parallel", "sequential"):
        lc.placement = placement  # switch the schedule in place; the gates are untouched
        print(f"{placement:>10}: {median_ms(lc, x):.2f} ms at batch 1")

    print("\nThe full table (accuracy, MACs, latency at batch 1 and 64, dense row):")
    compare(args.run, dense_run=args.dense_run, test_subset=args.test_subset)


if __name__ == "__main__":
    main()
