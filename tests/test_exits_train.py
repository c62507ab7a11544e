"""Training exits on a frozen network or together with it (``finetune --exits``), the budget sweep,
and ``lcsurgery exits evaluate`` on the built-in task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from zoo import randomize_gates

import lcsurgery
from lcsurgery.bench import tradeoff
from lcsurgery.cli import main
from lcsurgery.data.loaders import ArrayLoader, normalization
from lcsurgery.data.sources import load_arrays
from lcsurgery.models.cifar_resnet import resnet20
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.exits import ExitsConfig, load_exit_run, train_exits
from lcsurgery.train.loop import finetune
from lcsurgery.train.run_folder import load_run
from lcsurgery.viz.figures import extreme_picks

DATA = "synthetic:1000"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("exits")
    torch.manual_seed(0)
    torch.save(resnet20().state_dict(), root / "r20.pt")
    cfg = ExitsConfig(model="cifar:resnet20", data=DATA, checkpoint=str(root / "r20.pt"), out=str(root / "run"), epochs=1, batch_size=64, held_out=200)
    metrics = train_exits(cfg)
    return root, metrics


def test_training_leaves_the_network_as_it_was(run):
    root, metrics = run
    model, _ = load_exit_run(root / "run")
    saved = torch.load(root / "r20.pt", weights_only=True)
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in saved.items())
    plain = resnet20().eval()
    plain.load_state_dict(saved)
    test = load_arrays(DATA, "test").subset(None)
    mean, std = normalization(plain)
    with torch.no_grad():
        correct = sum(int((plain(x).argmax(1) == y).sum()) for x, y in ArrayLoader(test, 100, train=False, mean=mean, std=std))
    assert metrics["exit_accuracy"][-1] == pytest.approx(correct / len(test))
    assert metrics["test_images"] == 200 and metrics["held_out_images"] == 200


def test_the_sweep_meets_each_budget_on_held_out_images_and_costs_more_as_it_grows(run):
    _, metrics = run
    rows = metrics["sweep"]
    assert len(rows) >= 10
    assert all(r["held_out_fraction"] <= r["budget"] + 1e-9 for r in rows)
    fractions = [r["mac_fraction"] for r in sorted(rows, key=lambda r: r["budget"])]
    assert fractions == sorted(fractions)
    assert all(abs(sum(r["exit_shares"]) - 1) < 1e-6 for r in rows)
    learned = metrics["learned"]["sweep"]
    assert [r["budget"] for r in learned] == [r["budget"] for r in rows[-len(learned) :]]
    assert all(r["held_out_fraction"] <= r["budget"] + 1e-9 for r in learned) and len(metrics["learned"]["scorer"]) == len(metrics["exits"])


def test_evaluate_runs_the_engine_to_the_sweeps_numbers_and_holds_the_cap(run, capsys):
    root, metrics = run
    folder = root / "run"
    assert main(["exits", "evaluate", str(folder), "--budget", "0.5", ]) == 0
    result = json.loads((folder / "evaluate.json").read_text())
    row = next(r for r in metrics["sweep"] if r["budget"] == 0.5)
    assert result["threshold"] == row["threshold"]
    assert result["mac_fraction"] == pytest.approx(row["mac_fraction"], abs=1e-9)
    assert result["accuracy"] == pytest.approx(row["accuracy"], abs=1.5 / 200)  # the engine's batches differ; a tie may flip one image
    assert main(["exits", "evaluate", str(folder), "--budget", "0.5", "--policy", "learned"]) == 0
    learned = json.loads((folder / "evaluate.json").read_text())
    row = next(r for r in metrics["learned"]["sweep"] if r["budget"] == 0.5)
    assert learned["policy"] == "learned" and learned["mac_fraction"] == pytest.approx(row["mac_fraction"], abs=1e-9)
    cap = metrics["exit_costs"][2]
    assert main(["exits", "evaluate", str(folder), "--max-macs", str(cap), ]) == 0
    capped = json.loads((folder / "evaluate.json").read_text())
    assert (folder / "exits_by_class.png").stat().st_size > 10_000 and (folder / "exits_extremes.png").stat().st_size > 10_000
    assert capped["max_macs_seen"] <= cap and sum(capped["exit_shares"][3:]) == 0
    assert main(["exits", "evaluate", str(folder)]) == 2
    assert "give --budget (a fraction of the dense MACs), --max-macs (MACs per image), or both" in capsys.readouterr().err


def test_the_easiest_images_leave_first_most_confident_and_the_hardest_last_least_confident():
    macs = torch.tensor([5, 1, 9, 1, 9, 1, 5, 9])
    confidence = torch.tensor([0.5, 0.7, 0.9, 0.95, 0.2, 0.6, 0.1, 0.4])
    fewest, most = extreme_picks(macs, 3, confidence)
    assert fewest.tolist() == [3, 1, 5] and most.tolist() == [4, 7, 2]
    fewest, most = extreme_picks(macs, 4)  # no confidence: the order of the images among equals
    assert fewest.tolist() == [1, 3, 5, 0] and most.tolist() == [7, 4, 2, 6]


def test_training_the_backbone_with_its_exits_changes_it_and_keeps_the_start_as_teacher(run):
    root, _ = run
    cfg = ExitsConfig(
        model="cifar:resnet20", data=DATA, checkpoint=str(root / "r20.pt"), out=str(root / "joint"), epochs=1, batch_size=64, held_out=200,
        train_backbone=True, hidden=32,
    )  # fmt: skip
    metrics = train_exits(cfg)
    model, saved_cfg = load_exit_run(root / "joint")
    assert saved_cfg.train_backbone and all(h.fc.in_features == 32 for h in model.heads)
    start = torch.load(root / "r20.pt", weights_only=True)
    assert not torch.equal(model.backbone.state_dict()["conv1.weight"], start["conv1.weight"])
    first = json.loads((root / "run" / "metrics.json").read_text())
    assert metrics["start_accuracy"] == pytest.approx(first["dense_accuracy"])  # the untouched network, measured by the frozen run


def test_figure_redraws_the_sweep_and_says_what_a_tradeoff_folder_lacks(run, tmp_path, capsys):
    root, _ = run
    assert main(["exits", "figure", str(root / "run"), "--out", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").stat().st_size > 10_000
    assert main(["exits", "figure", str(root / "run"), "--tradeoff", str(tmp_path)]) == 2
    assert "has no results.json: run lcsurgery bench tradeoff (or --report-only) there first" in capsys.readouterr().err
    assert main(["exits", "figure", str(root / "run"), "--also", str(tmp_path), "--out", str(tmp_path / "both.png")]) == 2
    assert f"{tmp_path} is not a finished exits run (no sweep in its metrics.json): lcsurgery exits sweep {tmp_path} writes one" in capsys.readouterr().err


def test_exits_on_a_gated_run_charge_each_image_its_gates_and_the_engine_gives_the_sweeps_numbers(run, capsys):
    root, _ = run
    plain = resnet20()
    plain.load_state_dict(torch.load(root / "r20.pt", weights_only=True))
    lc = lcsurgery.convert(plain.eval(), placement="sequential").eval()
    randomize_gates(lc, seed=0, scale=4.0)  # gates that differ per image, standing in for a finetune run's
    with torch.no_grad():
        for b in lc.lc_blocks():
            b.l_net.bias.add_(1.5)  # most blocks kept
            b.c_net.bias.add_(0.5)
    gated = root / "gated"
    gated.mkdir()
    (gated / "config.json").write_text(json.dumps(FinetuneConfig(model="cifar:resnet20", data=DATA, placement="sequential", out=str(gated)).identity()))
    torch.save(lc.state_dict(), gated / "model.pt")
    test = load_arrays(DATA, "test").subset(None)
    report = lcsurgery.count_macs(lc, ArrayLoader(test, 100, train=False, mean=normalization(plain)[0], std=normalization(plain)[1]), progress=False)
    assert len(set(report.per_sample.tolist())) > 10

    assert main(["exits", "train", "--run", str(gated), "--data", DATA, "--epochs", "1", "--batch-size", "64", "--held-out", "200", "--out", str(root / "both")]) == 0
    metrics = json.loads((root / "both" / "metrics.json").read_text())
    assert metrics["backbone_macs"] == pytest.approx(report.mean) and metrics["exit_accuracy"][-1] == pytest.approx(report.accuracy)
    top = max(r["budget"] for r in metrics["sweep"])
    assert top == pytest.approx(report.ratio, abs=0.03)  # the held-out images' cost with no early exit; no budget beyond it
    budget = max(r["budget"] for r in metrics["sweep"] if r["budget"] < top - 0.05)
    assert main(["exits", "evaluate", str(root / "both"), "--budget", str(budget)]) == 0
    result = json.loads((root / "both" / "evaluate.json").read_text())
    row = next(r for r in metrics["sweep"] if r["budget"] == budget)
    assert result["mac_fraction"] == pytest.approx(row["mac_fraction"], abs=1e-9) and result["mac_fraction"] < report.ratio
    # what ran, counted from the engine's exits as the sweep counted it from the replayed ones
    assert (result["distinct_patterns"], result["conditional_gates"]) == (row["distinct_patterns"], pytest.approx(row["conditional_gates"]))
    assert result["distinct_patterns"] > len(set(report.per_sample.tolist())) // 2 and (root / "both" / "exits_channels.png").stat().st_size > 10_000
    assert f"| {row['distinct_patterns']} | {100 * row['conditional_gates']:.1f}% |" in (root / "both" / "sweep.md").read_text()
    assert main(["exits", "train", "--run", str(gated), "--checkpoint", str(root / "r20.pt"), "--data", DATA, "--out", str(root / "bad")]) == 2
    assert "--run brings its own trained weights: drop --checkpoint and --pretrained" in capsys.readouterr().err
    assert main(["exits", "train", "--run", str(gated), "--train-backbone", "--data", DATA, "--out", str(root / "bad")]) == 2
    assert f"--train-backbone would train {gated}'s gates with no MAC budget" in capsys.readouterr().err and not (root / "bad").exists()


def test_bench_latency_times_an_exits_run_per_batch_with_the_engines_macs(run, tmp_path):
    root, _ = run
    out = tmp_path / "latency.json"
    args = ["bench", "latency", "--models", "--batches", "1", "8", "--exits", str(root / "run"), "--exit-budget", "0.5", "--exit-images", "40", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads(out.read_text())
    assert saved["rows"] == [] and [(r["batch"], r["images"], r["budget"]) for r in saved["exits"]] == [(1, 40, 0.5), (8, 40, 0.5)]
    assert main(["exits", "evaluate", str(root / "run"), "--budget", "0.5", "--test-subset", "40"]) == 0
    evaluated = json.loads((root / "run" / "evaluate.json").read_text())
    for r in saved["exits"]:  # the same images and policy as evaluate's; batches of 8 may flip a tie
        assert r["no_exits_macs"] == evaluated["dense_macs"] and r["exits_macs"] == pytest.approx(evaluated["mac_fraction"] * evaluated["dense_macs"], rel=0.02)
        assert r["mac_ratio"] == pytest.approx(r["no_exits_macs"] / r["exits_macs"]) and r["efficiency"] == pytest.approx(r["speedup"] / r["mac_ratio"])
    assert out.with_suffix(".md").read_text().count(f"| {root / 'run'} | 0.5 |") == 2


def test_sweep_rescores_a_run_to_the_same_numbers(run, tmp_path):
    root, metrics = run
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.pt", "metrics.json"):
        (folder / name).write_bytes((root / "run" / name).read_bytes())
    assert main(["exits", "sweep", str(folder)]) == 0
    again = json.loads((folder / "metrics.json").read_text())
    assert [(r["budget"], r["threshold"], r["accuracy"]) for r in again["sweep"]] == [(r["budget"], r["threshold"], r["accuracy"]) for r in metrics["sweep"]]
    assert (folder / "sweep.png").exists() and (folder / "sweep.md").read_text().count("| MAC budget |") == 2


TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
JOINT = ["--model", TINY, "--data", "synthetic:600", "--test-subset", "100", "--batch-size", "50", "--epochs", "2", "--budget", "0.7", "--placement", "sequential"]


@pytest.fixture(scope="module")
def joint(tmp_path_factory):
    out = tmp_path_factory.mktemp("joint") / "run"
    assert main(["finetune", *JOINT, "--exits", "--exit-held-out", "100", "--out", str(out)]) == 0
    return out


def test_finetune_with_exits_writes_an_exits_run_on_its_own_trained_network(joint, capsys):
    metrics = json.loads((joint / "metrics.json").read_text())
    exits, cfg = load_exit_run(joint / "exits")
    network, _, _ = load_run(joint)
    assert cfg.joint and cfg.run == str(joint) and cfg.held_out == 100 and cfg.epochs == 2
    assert exits.backbone.state_dict().keys() == network.state_dict().keys()
    assert all(torch.equal(exits.backbone.state_dict()[k], v) for k, v in network.state_dict().items())
    assert metrics["exits"]["run"] == str(joint / "exits") and len(metrics["exits"]["exit_accuracy"]) == exits.num_exits + 1
    assert metrics["exits"]["exit_accuracy"][-1] == pytest.approx(metrics["val_accuracy"], abs=1.5 / 100)  # the network's own head on the same test images
    log = [json.loads(line) for line in (joint / "log.jsonl").read_text().splitlines()]
    assert all(len(r["exit_accuracy_held_out"]) == exits.num_exits + 1 for r in log)
    assert {"heads", "heads_optimizer", "heads_scheduler"} <= set(torch.load(joint / "last.pt", weights_only=True))
    sweep = json.loads((joint / "exits" / "metrics.json").read_text())
    budget = min(r["budget"] for r in sweep["sweep"])
    assert main(["exits", "evaluate", str(joint), "--budget", str(budget), "--test-subset", "100"]) == 0  # the finetune run stands for its exits
    result = json.loads((joint / "exits" / "evaluate.json").read_text())
    assert result["mac_fraction"] == pytest.approx(next(r for r in sweep["sweep"] if r["budget"] == budget)["mac_fraction"], abs=1e-9)
    figure = joint.parent / "both.png"  # --also takes a finetune run for its exits, as RUN does
    assert main(["exits", "figure", str(joint), "--also", str(joint), "--out", str(figure)]) == 0 and figure.stat().st_size > 10_000


def test_the_sweep_of_a_gated_network_ends_at_its_own_cost_and_says_so(joint):
    metrics = json.loads((joint / "exits" / "metrics.json").read_text())
    top = max(r["budget"] for r in metrics["sweep"])
    assert top < 1 and abs(top - round(top, 2)) > 1e-9  # the gated network run to the end costs under the dense MACs
    assert f"| {top:.3f} (no early exit) |" in (joint / "exits" / "sweep.md").read_text()


def test_trade_off_rows_set_an_exits_run_to_a_budget_its_sweep_skipped_as_the_sweep_would(joint, tmp_path):
    folder = tmp_path / "exits"
    shutil.copytree(joint / "exits", folder)
    metrics = json.loads((folder / "metrics.json").read_text())
    row = metrics["sweep"][len(metrics["sweep"]) // 2]
    metrics["sweep"].remove(row)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    again = tradeoff._at_budget(folder, row["budget"])
    assert again["val_accuracy"] == pytest.approx(row["accuracy"], abs=1e-6) and again["p90_over_p10"] == pytest.approx(row["p90_over_p10"])
    assert again["mean_macs"] == pytest.approx(row["mac_fraction"] * metrics["dense_macs"]) and again["images"] == 100


def test_the_heads_loss_trains_the_heads_and_reaches_the_network(joint, tmp_path):
    """The same run with the heads' loss weighted 0 (same seed, data order and head initialisation):
    the heads end elsewhere, and so does the network (with the heads' loss detached from it, the
    two networks would be equal)."""
    still = tmp_path / "still"
    assert main(["finetune", *JOINT, "--exits", "--exit-held-out", "100", "--exit-weight", "0", "--out", str(still)]) == 0
    a = torch.load(joint / "exits" / "model.pt", weights_only=True)
    b = torch.load(still / "exits" / "model.pt", weights_only=True)
    heads = [k for k in a if k.startswith("heads.")]
    network = [k for k in a if k.startswith("backbone.") and a[k].is_floating_point()]
    assert heads and not any(torch.equal(a[k], b[k]) for k in heads if k.endswith("fc.weight"))
    assert not all(torch.equal(a[k], b[k]) for k in network)


def test_finetune_exits_refuses_what_it_cannot_do(tmp_path, capsys):
    assert main(["finetune", *JOINT, "--epochs", "1", "--out", str(tmp_path / "plain")]) == 0
    assert main(["exits", "evaluate", str(tmp_path / "plain"), "--budget", "0.5"]) == 2
    assert f"{tmp_path / 'plain'} is a finetune run without exits: train them with lcsurgery exits train --run" in capsys.readouterr().err
    assert main(["finetune", *JOINT, "--exits", "--exit-held-out", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--exit-held-out must be positive" in capsys.readouterr().err
    assert main(["finetune", *JOINT, "--exits", "layer9.9", "--out", str(tmp_path / "b")]) == 2
    assert "no exit can go after 'layer9.9'" in capsys.readouterr().err
