"""The command line: the demo end to end, and one clear error (exit status 2) for bad input."""

from __future__ import annotations

import pytest

import json

from PIL import Image

from lcsurgery.cli import main


@pytest.mark.slow
def test_demo_end_to_end_on_the_built_in_task(capsys, tmp_path):
    out = tmp_path / "demo"
    args = ["demo", "--data", "synthetic:600", "--epochs", "1", "--test-subset", "200", "--rounds", "3", "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "CifarResNet: 9 residual blocks to gate" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["run"] for r in rows] == ["dense", "static-sequential-50", "sequential-50", "parallel-50"]
    assert rows[0]["mac_fraction"] == 1.0 and all(r["mac_fraction"] < 1.0 for r in rows[1:])
    table = json.loads((out / "sequential-50" / "compare.json").read_text())
    assert table["identical_predictions"] == table["images"] > 0  # one set of gates, two schedules
    acc = {r["model"]: r["accuracy"] for r in table["rows"]}
    assert acc["LC-Net, parallel"] == acc["LC-Net, sequential"]
    macs = {r["model"]: r["macs"] for r in table["rows"]}
    assert macs["LC-Net, sequential"] < macs["LC-Net, parallel"] < macs["dense fine-tune"]
    # the exits row: the sequential network with its exits at 0.8 of the budget, as `exits evaluate` measured it on the same images
    evaluated = json.loads((out / "exits" / "evaluate.json").read_text())
    exits_row = "LC-Net, sequential, with exits (budget 0.4)"
    assert evaluated["budget"] == 0.4 and evaluated["test_images"] == table["images"]
    assert acc[exits_row] == pytest.approx(evaluated["accuracy"]) and macs[exits_row] == pytest.approx(evaluated["mac_fraction"] * evaluated["dense_macs"])
    assert macs[exits_row] < macs["LC-Net, sequential"]
    for name in ("tradeoff", "extreme_images", "channel_heatmap", "macs_histogram", "skip_rates", "gate_usage", "exits_sweep"):
        with Image.open(out / "figures" / f"{name}.png") as im:
            assert im.width >= 400 and im.height >= 300, name
    assert (out / "exits" / "exits_extremes.png").stat().st_size > 10_000 and (out / "exits" / "exits_channels.png").stat().st_size > 10_000
    assert evaluated["distinct_patterns"] > 1 and evaluated["conditional_gates"] > 0  # images that left early ran fewer gates
    assert main(["compare", str(out / "parallel-50"), "--exits", str(out / "exits")]) == 2  # exits on another run's network
    assert f"holds exits on {out / 'sequential-50'}, not on {out / 'parallel-50'}" in capsys.readouterr().err
    assert main(args) == 0  # finished runs are reused, not retrained
    assert "training" not in capsys.readouterr().out


def test_demo_on_a_missing_data_path(capsys, tmp_path):
    assert main(["demo", "--data", str(tmp_path / "nope.tar.gz"), "--checkpoint", "x.th", "--out", str(tmp_path / "d")]) == 2
    assert "does not exist" in capsys.readouterr().err
