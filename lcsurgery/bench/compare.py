"""Placement comparison in the style of the paper's Table 1: dense vs LC-Net parallel vs sequential.

One fine-tuned converted model serves both placements: the gates, hence the outputs, are the
same; what differs is the schedule. Parallel runs the gates beside each block's first conv
(no added latency) and so always pays that conv in full in a kept block; sequential runs the
gates first and trims the first conv's filters too. The comparison measures, on the same test
images: top-1 accuracy under each placement (identical predictions are checked, not assumed),
mean MACs per image, the MAC reduction, and CPU latency at batch 1 and 64, interleaved. With
``exits`` (an exits run trained on this run's network), one more row: the same network with its
early exits under a MAC budget set on the exits run's held-out training images.
"""

from __future__ import annotations

import copy
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

import lcsurgery
from lcsurgery.bench.threads import num_threads
from lcsurgery.data.loaders import make_loaders
from lcsurgery.errors import LCSurgeryError
from lcsurgery.models.factory import create_model
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.exits import exit_run_at_budget, run_exits
from lcsurgery.train.run_folder import load_run


@dataclass
class CompareRow:
    model: str
    accuracy: float
    macs: float
    mac_reduction: float  # dense MACs / these MACs
    latency_ms: dict  # batch size -> median ms per batch
    speedup: dict  # batch size -> dense latency / this latency


def _accuracy_and_predictions(model: nn.Module, loader) -> tuple[float, torch.Tensor]:
    preds, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            preds.append(model(x).argmax(1))
            labels.append(y)
    p, y = torch.cat(preds), torch.cat(labels)
    return float((p == y).double().mean()), p


def _latency(models: dict[str, nn.Module], images: torch.Tensor, batch: int, rounds: int) -> dict[str, float]:
    """Median ms per batch, round-robin across models; batch 1 cycles through the images."""
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)] or [images[:batch]]
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for n, m in models.items():  # warm-up: plans, caches, allocator
            for b in batches[:3]:
                m(b)
        for r in range(rounds):
            b = batches[r % len(batches)]
            for n, m in models.items():
                t0 = time.perf_counter()
                m(b)
                times[n].append(time.perf_counter() - t0)
    return {n: statistics.median(t) * 1e3 for n, t in times.items()}


def compare(
    run: Path,
    data: str | None = None,
    dense_run: Path | None = None,
    test_subset: int | None = 2000,
    batches: tuple[int, ...] = (1, 64),
    threads: int = 1,
    rounds: int = 100,
    exits: Path | None = None,
    exit_budget: float = 0.4,
) -> dict:
    """The comparison for the run in ``run``; returns (and writes to ``run``) the table and numbers."""
    lc, cfg, classes = load_run(run)
    dense, dense_label = _dense_model(cfg, dense_run, classes)
    exit_model = exit_run_at_budget(exits, exit_budget, test_subset, on=run)[0] if exits is not None else None
    loaders = make_loaders(data or cfg.data, lc, 250, size=cfg.size, test_subset=test_subset)
    acc, macs = {}, {}
    preds = {}
    for placement in ("parallel", "sequential"):
        lc.placement = placement
        report = lcsurgery.count_macs(lc, loaders.test, placement)
        acc[placement], preds[placement] = report.accuracy, report.predictions
        macs[placement] = report.mean
        dense_macs = report.dense
    acc["dense"], _ = _accuracy_and_predictions(dense, loaders.test)
    macs["dense"] = dense_macs
    same = int((preds["parallel"] == preds["sequential"]).sum())
    models = {"dense": dense, "parallel": lc, "sequential": _copy_with_placement(lc, "sequential")}
    labels = {"dense": dense_label, "parallel": "LC-Net, parallel", "sequential": "LC-Net, sequential"}
    if exit_model is not None:
        r = run_exits(exit_model, loaders.test)
        acc["exits"], macs["exits"] = float((r["prediction"] == r["label"]).double().mean()), float(r["macs"].double().mean())
        models["exits"] = exit_model
        labels["exits"] = f"LC-Net, {exit_model.backbone.placement}, with exits (budget {exit_budget})"
    images = torch.cat([x for x, _ in loaders.test])[:256]
    lc.placement = "parallel"
    with num_threads(threads):
        latency = {b: _latency(models, images, b, rounds if b == 1 else max(rounds // 5, 10)) for b in batches}
    rows = []
    for key, label in labels.items():
        lat = {b: latency[b][key] for b in batches}
        rows.append(CompareRow(label, acc[key], macs[key], dense_macs / macs[key], lat, {b: latency[b]["dense"] / lat[b] for b in batches}))
    result = {
        "run": str(run),
        "images": len(preds["parallel"]),
        "identical_predictions": same,
        "threads": threads,
        "date": time.strftime("%Y-%m-%d"),
        "rows": [asdict(r) for r in rows],
    }
    table = format_table(rows, batches, same, len(preds["parallel"]), threads)
    (run / "compare.json").write_text(json.dumps(result, indent=2))
    (run / "compare.md").write_text(table + "\n")
    print(table)
    return result


def _copy_with_placement(lc: nn.Module, placement: str) -> nn.Module:
    other = copy.deepcopy(lc)
    other.placement = placement
    return other.eval()


def _dense_model(cfg: FinetuneConfig, dense_run: Path | None, classes: int) -> tuple[nn.Module, str]:
    """The dense baseline: a dense fine-tune run when given, else the run's starting weights."""
    if dense_run is not None:
        model, _, _ = load_run(dense_run)
        return model, "dense fine-tune"
    model = create_model(cfg.model, num_classes=classes)
    if cfg.checkpoint:
        lcsurgery.load_weights(model, cfg.checkpoint, reinit_head=True)
    return model.eval(), "dense (starting weights)"


def format_table(rows: list[CompareRow], batches, same: int, n: int, threads: int) -> str:
    lat_heads = " | ".join(f"latency b{b} (ms)" for b in batches)
    lines = [f"| model | top-1 | MACs / image | MAC reduction | {lat_heads} |", "|---|---|---|---|" + "---|" * len(batches)]
    for r in rows:
        lats = " | ".join(f"{r.latency_ms[b]:.2f} ({r.speedup[b]:.2f}x)" for b in batches)
        lines.append(f"| {r.model} | {100 * r.accuracy:.2f}% | {r.macs / 1e6:.2f}M | {r.mac_reduction:.2f}x | {lats} |")
    lines.append(f"\nSame gates for both placements: identical predictions on {same} of {n} test images. CPU latency, {threads} thread(s), median of interleaved runs; (x): speed-up over the dense model.")
    return "\n".join(lines)

