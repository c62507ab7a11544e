"""Figures (PNG) for a fine-tuned run: easiest/hardest images, channel heat map, MAC histogram,
per-block skip rates, the controller's trajectory, and the trade-off plot of a benchmark folder.

  lcsurgery figures runs/r20-seq50 [--tradeoff runs/tradeoff] [--out figures/]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lcsurgery
from lcsurgery.train.run_folder import load_run
from lcsurgery.cli.compare import add_run_arguments
from lcsurgery.data.loaders import make_loaders, normalization
from lcsurgery.viz import figures


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--tradeoff", help="a lcsurgery bench tradeoff folder (results.json) for the trade-off plot")
    p.add_argument("--out", help="folder for the PNGs (default: <run>/figures)")


def run(args: argparse.Namespace) -> int:
    written = make_figures(Path(args.run), args.data, args.test_subset or None, Path(args.out) if args.out else None, Path(args.tradeoff) if args.tradeoff else None)
    for p in written:
        print(p)
    return 0


def make_figures(run: Path, data: str | None, test_subset: int | None, out: Path | None, tradeoff: Path | None) -> list[Path]:
    """All figures for one run folder; returns the PNG paths."""
    lc, cfg, _ = load_run(run)
    out = out or run / "figures"
    loaders = make_loaders(data or cfg.data, lc, 250, size=cfg.size, test_subset=test_subset)
    report = lcsurgery.count_macs(lc, loaders.test, "sequential", keep_masks=True)
    other = report.with_placement("parallel")
    mean, std = normalization(lc)
    images = torch.cat([x for x, _ in loaders.test]) * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    written = [
        figures.extreme_images(images, report.per_sample, report.labels, report.predictions, loaders.classes, out / "extreme_images.png", dense=report.dense),
        figures.macs_histogram({"sequential": report.per_sample, "parallel": other.per_sample}, report.dense, out / "macs_histogram.png", report.dynamics().get("distinct_patterns")),
        figures.skip_rates(report.by_block, out / "skip_rates.png"),
        figures.gate_usage(report.usage.rates(), out / "gate_usage.png"),
    ]
    if report.masks:
        written.append(figures.channel_heatmap(report.masks, report.labels, loaders.classes, out / "channel_heatmap.png"))
    if (run / "steps.jsonl").exists():
        written.append(figures.controller_plot(run / "steps.jsonl", out / "controller.png", cfg.budget))
    if tradeoff is not None:
        groups = json.loads((tradeoff / "results.json").read_text())["groups"]
        written.append(figures.tradeoff_plot(groups, out / "tradeoff.png"))
    return written
