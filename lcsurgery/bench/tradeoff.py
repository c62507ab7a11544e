"""Accuracy vs MACs trade-off: a dense fine-tune and LC-Net at several MAC budgets per placement.

Every run is an ordinary ``lcsurgery finetune`` run folder under ``--out``; finished runs
(``metrics.json`` present) are reused and interrupted ones resumed, so the benchmark can be
stopped and restarted. All runs use the same data, epochs and seed. With ``--teacher dense``
the gated runs distil from the dense run (trained first). Writes ``results.json``,
``results.md`` (the table) and ``tradeoff.png``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lcsurgery.errors import LCSurgeryError
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune


def _runs(base: FinetuneConfig, budgets: list[float], out: Path) -> list[tuple[str, FinetuneConfig]]:
    """The dense run first (never distilled), then one gated run per placement and budget;
    ``teacher="dense"`` makes the gated runs distil from the benchmark's own dense run."""
    runs = [("dense", dataclasses.replace(base, dense=True, budget=None, teacher=None, out=str(out / "dense")))]
    if base.teacher == "dense":
        base = dataclasses.replace(base, teacher=str(out / "dense"))
    for placement in ("sequential", "parallel"):
        for b in budgets:
            name = f"{placement}-{round(100 * b)}"
            runs.append((name, dataclasses.replace(base, placement=placement, budget=b, out=str(out / name))))
    return runs


def run(base: FinetuneConfig, budgets: list[float], out: Path, train: bool = True) -> list[dict]:
    """Run (or reuse) every fine-tune, then tabulate and plot; ``train=False`` reports the finished runs only."""
    rows = []
    for name, cfg in _runs(base, budgets, out):
        metrics_file = Path(cfg.out) / "metrics.json"
        if not metrics_file.exists() and not train:
            print(f"== {name}: not finished, left out of the report")
            continue
        if not metrics_file.exists():
            print(f"== {name}: training ({cfg.epochs} epochs)")
            finetune(dataclasses.replace(cfg, resume=(Path(cfg.out) / "last.pt").exists(), force=not (Path(cfg.out) / "last.pt").exists()))
        m = json.loads(metrics_file.read_text())
        rows.append({
            "run": name, "placement": m.get("placement"), "budget": m.get("budget"),
            "val_accuracy": m["val_accuracy"], "mean_macs": m["mean_macs"], "dense_macs": m["dense_macs"],
            "mac_fraction": m["mean_macs"] / m["dense_macs"], "macs_by_placement": m.get("mean_macs_by_placement"),
        })  # fmt: skip
    dense = next((r for r in rows if r["run"] == "dense"), None)
    if dense is None:
        raise LCSurgeryError(f"no finished dense run in {out}: the table compares against it")
    for r in rows:
        r["accuracy_change_points"] = 100 * (r["val_accuracy"] - dense["val_accuracy"])
        r["within_5pct_of_budget"] = None if r["budget"] is None else abs(r["mac_fraction"] - r["budget"]) <= 0.05 * r["budget"]
    (out / "results.json").write_text(json.dumps({"config": dataclasses.asdict(base), "budgets": budgets, "rows": rows}, indent=2))
    table = format_table(rows, base)
    (out / "results.md").write_text(table + "\n")
    print(table)
    from lcsurgery.viz.figures import tradeoff_plot

    tradeoff_plot(rows, out / "tradeoff.png", title=f"{base.model} on {Path(base.data).name}, {base.epochs} epochs per run")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'tradeoff.png'}")
    return rows


def format_table(rows: list[dict], base: FinetuneConfig) -> str:
    lines = [
        "| run | placement | MAC budget | top-1 accuracy | vs dense (points) | mean MACs / image | fraction of dense | same gates, other schedule |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        budget = "-" if r["budget"] is None else f"{r['budget']:.2f}"
        other = {k: v for k, v in (r.get("macs_by_placement") or {}).items() if k != r["placement"]}
        other_cell = ", ".join(f"{k} {v / 1e6:.2f}M ({v / r['dense_macs']:.3f})" for k, v in other.items()) or "-"
        lines.append(
            f"| {r['run']} | {r['placement'] or 'dense'} | {budget} | {100 * r['val_accuracy']:.2f}% | "
            f"{r['accuracy_change_points']:+.2f} | {r['mean_macs'] / 1e6:.2f}M | {r['mac_fraction']:.3f} | {other_cell} |"
        )
    return "\n".join(lines)
