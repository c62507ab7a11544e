"""The trade-off benchmark's plan, its reuse check and its table (no training: run folders are written by hand)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from lcsurgery.bench import tradeoff
from lcsurgery.cli import main
from lcsurgery.errors import LCSurgeryError
from lcsurgery.train.config import FinetuneConfig

TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
DENSE_MACS = 1000.0


def _finished(planned: tradeoff.Planned, accuracy: float, fraction: float, patterns: int | None = None) -> None:
    """A run folder as finetune leaves it, with chosen results."""
    folder = Path(planned.cfg.out)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(dataclasses.asdict(planned.cfg)))
    dynamics = None if patterns is None else {"images": 100, "mac_fraction": {"p90_over_p10": 1.5}, "distinct_patterns": patterns, "conditional_gates": 0.4}
    metrics = {"val_accuracy": accuracy, "mean_macs": fraction * DENSE_MACS, "dense_macs": DENSE_MACS, "placement": planned.cfg.placement,
               "budget": planned.cfg.budget, "dynamics": dynamics}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_recipes_add_sequential_runs_with_their_options_per_seed(tmp_path):
    runs = {r.name: r for r in tradeoff.plan(FinetuneConfig(model=TINY, teacher="dense"), [0.5], tmp_path, seeds=[0, 1], recipes=("std", "importance"))}
    assert set(runs) == {"dense"} | {f"{n}{s}" for s in ("", "-s1") for n in (
        "static-sequential-50", "sequential-50", "parallel-50", "std-sequential-50", "importance-sequential-50")}  # fmt: skip
    imp = runs["importance-sequential-50-s1"]
    assert (imp.kind, imp.recipe, imp.seed) == ("dynamic", "importance", 1)
    assert (imp.cfg.placement, imp.cfg.per_image_loss, imp.cfg.gate_input_momentum, imp.cfg.budget) == ("sequential", "importance", 0.05, 0.5)
    assert imp.cfg.teacher == str(tmp_path / "dense") and imp.cfg.out == str(tmp_path / "importance-sequential-50-s1")
    assert runs["sequential-50"].cfg.per_image_loss == "none" and runs["sequential-50"].cfg.gate_input_momentum == 0.0


def test_unknown_recipe_or_baseline_is_refused_with_the_choices():
    with pytest.raises(LCSurgeryError, match="unknown recipes \\['magic'\\]: choose from std, importance, shaping"):
        tradeoff.plan(FinetuneConfig(model=TINY), [0.5], Path("x"), recipes=("magic",))
    with pytest.raises(LCSurgeryError, match="unknown baselines"):
        tradeoff.plan(FinetuneConfig(model=TINY), [0.5], Path("x"), baselines=("magic",))


def test_table_averages_seeds_per_recipe_and_says_what_dynamic_gating_gains(tmp_path):
    base = FinetuneConfig(model=TINY, teacher="dense", epochs=1)
    planned = {r.name: r for r in tradeoff.plan(base, [0.5], tmp_path, seeds=[0, 1], recipes=("std",))}
    results = {  # name: (top-1, fraction of dense MACs, distinct patterns)
        "dense": (0.90, 1.0, None), "static-sequential-50": (0.86, 0.50, 1), "static-sequential-50-s1": (0.84, 0.52, 1),
        "sequential-50": (0.87, 0.49, 3), "sequential-50-s1": (0.86, 0.50, 5), "parallel-50": (0.85, 0.50, 2), "parallel-50-s1": (0.84, 0.50, 2),
        "std-sequential-50": (0.83, 0.50, 90), "std-sequential-50-s1": (0.84, 0.48, 110),
    }  # fmt: skip
    for name, (acc, frac, patterns) in results.items():
        _finished(planned[name], acc, frac, patterns)
    tradeoff.run(base, [0.5], tmp_path, train=False, seeds=[0, 1], recipes=("std",))
    groups = {(g["kind"], g["placement"], g["recipe"]): g for g in json.loads((tmp_path / "results.json").read_text())["groups"]}
    std = groups[("dynamic", "sequential", "std")]
    assert std["runs"] == ["std-sequential-50", "std-sequential-50-s1"] and std["val_accuracy"] == pytest.approx(0.835)
    assert std["mac_fraction"] == pytest.approx(0.49) and std["distinct_patterns"] == pytest.approx(100)
    assert groups[("static", "sequential", "default")]["accuracy_change_points"] == pytest.approx(-5.0)
    table = (tmp_path / "results.md").read_text()
    assert "| 0.50 | LC-Net dynamic, sequential, standardised gate input | 83.50% | 83.00 / 84.00 | -6.50 | 0.500 / 0.480 | 1.50 | 100 of 100 | 40.0% |" in table
    assert "- budget 0.50: dynamic (sequential) minus static gates: +1.50 points of top-1" in table
    assert "- budget 0.50: dynamic (sequential, std) minus static gates: -1.50 points of top-1" in table
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_a_finished_run_made_with_other_options_is_not_reused(tmp_path):
    base = FinetuneConfig(model=TINY, epochs=1)
    planned = tradeoff.plan(base, [0.5], tmp_path, baselines=())
    for r in planned:
        _finished(dataclasses.replace(r, cfg=dataclasses.replace(r.cfg, lr=0.5) if r.name == "parallel-50" else r.cfg), 0.8, 0.5, 1)
    with pytest.raises(LCSurgeryError, match=r"parallel-50 holds a run made with other options \(lr: 0.5 -> 0.03\)"):
        tradeoff.run(base, [0.5], tmp_path, train=False, baselines=())


def test_recipe_budgets_limit_the_recipe_rows_to_those_budgets(tmp_path):
    runs = [r.name for r in tradeoff.plan(FinetuneConfig(model=TINY), [0.7, 0.5], tmp_path, recipes=("std",), recipe_budgets=[0.5])]
    assert runs == ["dense", "static-sequential-70", "sequential-70", "parallel-70", "static-sequential-50", "sequential-50", "parallel-50", "std-sequential-50"]


def test_runs_trained_in_parallel_processes_match_runs_trained_in_this_one(tmp_path, monkeypatch):
    monkeypatch.setattr(tradeoff.os, "cpu_count", lambda: 2)  # so each of the two workers takes one thread, as this process does
    base = FinetuneConfig(model=TINY, data="synthetic:200", test_subset=40, batch_size=40, epochs=1, teacher="dense")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tradeoff.run(base, [0.5], tmp_path / "one", jobs=1)
    finally:
        torch.set_num_threads(threads)
    tradeoff.run(base, [0.5], tmp_path / "two", jobs=2)
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["rows"] for d in ("one", "two"))
    assert [r["run"] for r in two] == ["dense", "static-sequential-50", "sequential-50", "parallel-50"]
    for a, b in zip(one, two, strict=True):
        assert (a["val_accuracy"], a["mean_macs"]) == (b["val_accuracy"], b["mean_macs"]), a["run"]
    assert "epoch 1: val accuracy" in (tmp_path / "two" / "sequential-50" / "train.log").read_text()


def test_exits_rows_train_above_their_budget_with_exits_and_static_or_dynamic_gates(tmp_path):
    runs = {r.name: r for r in tradeoff.plan(FinetuneConfig(model=TINY, teacher="dense"), [0.5, 0.35], tmp_path, seeds=[0, 1], exits=True)}
    for name, kind, static in (("exits-sequential-35-s1", "dynamic+exits", False), ("exits-static-sequential-35-s1", "static+exits", True)):
        r = runs[name]
        assert (r.kind, r.seed, r.budget, r.cfg.budget, r.cfg.static, r.cfg.exits, r.cfg.placement) == (kind, 1, 0.35, 0.45, static, ["macs"], "sequential")
    assert runs["exits-sequential-50"].cfg.budget == 0.6 and runs["sequential-50"].cfg.exits is None and runs["sequential-50"].budget == 0.5
    assert tradeoff.plan(FinetuneConfig(model=TINY), [0.95], tmp_path, exits=True)[-1].cfg.budget == 1.0
    with pytest.raises(LCSurgeryError, match="the trade-off base run has exits: pass exits=True"):
        tradeoff.plan(FinetuneConfig(model=TINY, exits=[]), [0.5], tmp_path)


def test_exits_rows_report_the_sweep_at_their_budget_against_the_dense_networks_macs(tmp_path):
    base = FinetuneConfig(model=TINY, teacher="dense", epochs=1)
    planned = {r.name: r for r in tradeoff.plan(base, [0.5], tmp_path, exits=True)}
    results = {"dense": (0.90, 1.0, None), "static-sequential-50": (0.86, 0.50, 1), "sequential-50": (0.865, 0.50, 3), "parallel-50": (0.85, 0.50, 2)}
    for name, (acc, frac, patterns) in results.items():
        _finished(planned[name], acc, frac, patterns)
    for name, acc, own_dense in (("exits-static-sequential-50", 0.87, 990.0), ("exits-sequential-50", 0.88, DENSE_MACS)):
        _finished(planned[name], 0.89, 0.6, 4)  # the network's own head, at the budget it trained for
        sweep = [{"budget": b, "accuracy": acc - 0.01 * (b == 0.45), "mac_fraction": b + 0.004, "p90_over_p10": 2.25} for b in (0.45, 0.5)]
        if name == "exits-sequential-50":  # what ran, counted as a gated network's sweep counts it
            sweep[1].update(distinct_patterns=40, conditional_gates=0.5)
        (Path(planned[name].cfg.out) / "exits").mkdir()
        (Path(planned[name].cfg.out) / "exits" / "metrics.json").write_text(json.dumps({"sweep": sweep, "dense_macs": own_dense, "test_images": 100}))
    assert main(["bench", "tradeoff", "--model", TINY, "--teacher", "dense", "--epochs", "1", "--budgets", "0.5", "--exits", "--report-only", "--out", str(tmp_path)]) == 0
    rows = {r["run"]: r for r in json.loads((tmp_path / "results.json").read_text())["rows"]}
    static = rows["exits-static-sequential-50"]
    assert (static["val_accuracy"], static["budget"], static["trained_for"]) == (0.87, 0.5, 0.6)
    assert static["mac_fraction"] == pytest.approx(0.504 * 990 / DENSE_MACS) and static["within_5pct_of_budget"]
    table = (tmp_path / "results.md").read_text()
    assert "| 0.50 | LC-Net dynamic, sequential + exits (trained for 0.60) | 88.00% | 88.00 | -2.00 | 0.504 | 2.25 | 40 of 100 | 50.0% |" in table
    assert "| 0.50 | LC-Net static gates + exits (trained for 0.60) | 87.00% | 87.00 | -3.00 | 0.499 | 2.25 | - | - |" in table
    assert "- with exits, patterns and conditional gates count what each image ran: its own gates up to the exit it left at, and that exit" in table
    assert "- budget 0.50: dynamic + exits minus static gates: +2.00 points of top-1" in table
    assert "- budget 0.50: dynamic + exits minus static gates + exits: +1.00 points of top-1" in table
    assert "- budget 0.50: dynamic (sequential) minus static gates: +0.50 points of top-1" in table
