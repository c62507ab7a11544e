"""Does the MAC budget land? Short fine-tunes over placements, budgets and seeds, on one or two tasks.

Each run is the end-to-end budget test's configuration (the shipped or given pretrained ResNet-20,
6000 training images, 4 epochs at batch 32: 750 steps, one thread), so the table states the
spread that test must tolerate. Tasks: ``builtin`` (the shapes task and the ResNet-20 shipped for
it) and ``data`` (``--data`` with ``--checkpoint``, e.g. CIFAR-10). Every run is an ordinary run
folder under ``--out`` and is reused when finished. Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from lcsurgery.assets import SHAPES_RESNET20
from lcsurgery.errors import LCSurgeryError
from lcsurgery.train.budget import TOLERANCE
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune


@dataclass(frozen=True)
class Task:
    """What the runs fine-tune: a name for the table, the data spec and the starting weights."""

    name: str
    data: str
    checkpoint: str


BUILTIN = Task("builtin", "synthetic:6000", str(SHAPES_RESNET20))


def config(task: Task, placement: str, budget: float, seed: int, out: Path) -> FinetuneConfig:
    """The end-to-end budget test's run for one task, placement, budget and seed."""
    return FinetuneConfig(
        model="cifar:resnet20", data=task.data, checkpoint=task.checkpoint, train_subset=6000, test_subset=1000, epochs=4, batch_size=32,
        budget=budget, placement=placement, seed=seed, out=str(out / task.name / f"{placement}-{round(100 * budget)}-s{seed}"),
    )  # fmt: skip


def run(tasks: list[Task], placements: list[str], budgets: list[float], seeds: list[int], out: Path, train: bool = True) -> list[dict]:
    """Run (or reuse) every fine-tune at one thread, then tabulate where each landed."""
    if not tasks:
        raise LCSurgeryError("no task to run: give --builtin, or --data with --checkpoint")
    torch.set_num_threads(1)
    rows = []
    for task in tasks:
        for placement in placements:
            for budget in budgets:
                fractions = []
                for seed in seeds:
                    cfg = config(task, placement, budget, seed, out)
                    metrics_file = Path(cfg.out) / "metrics.json"
                    if not metrics_file.exists():
                        if not train:
                            continue
                        print(f"== {task.name} {placement} {budget} seed {seed}")
                        finetune(dataclasses.replace(cfg, force=True))
                    m = json.loads(metrics_file.read_text())
                    fractions.append(m["mean_macs"] / m["dense_macs"])
                if fractions:
                    errors = [f / budget - 1 for f in fractions]
                    rows.append({
                        "task": task.name, "placement": placement, "budget": budget, "seeds": seeds[: len(fractions)], "fractions": fractions,
                        "mean_error": statistics.fmean(errors), "worst_error": max(errors, key=abs), "within": sum(abs(e) <= TOLERANCE for e in errors),
                    })  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| task | placement | budget | landed (fraction of dense MACs, per seed) | mean error | worst error | within 5% |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        landed = " / ".join(f"{f:.3f}" for f in r["fractions"])
        lines.append(
            f"| {r['task']} | {r['placement']} | {r['budget']:.2f} | {landed} | {100 * r['mean_error']:+.1f}% | {100 * r['worst_error']:+.1f}% | {r['within']} of {len(r['fractions'])} |"
        )
    return "\n".join(lines)
