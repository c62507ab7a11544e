"""A fine-tuning run end to end: what it writes, resuming after a kill, torchrun, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import lcsurgery
from lcsurgery.cli import main
from lcsurgery.models.factory import create_model
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune

TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
FAST = ["--data", "synthetic:400", "--test-subset", "100", "--batch-size", "40", "--epochs", "2"]


def _reject(name: str) -> None:
    raise AssertionError(f"{name} in JSON output")


def test_run_writes_logs_checkpoint_and_metrics(tmp_path):
    out = tmp_path / "run"
    metrics = finetune(FinetuneConfig(model=TINY, data="synthetic:400", test_subset=100, batch_size=40, epochs=2, budget=0.7, placement="sequential", out=str(out)))
    saved = json.loads((out / "metrics.json").read_text(), parse_constant=_reject)  # strict JSON: no NaN
    assert saved == json.loads(json.dumps(metrics))
    assert 0.0 <= saved["val_accuracy"] <= 1.0 and saved["placement"] == "sequential"
    assert 0 < saved["mean_macs"] <= saved["dense_macs"] * 1.01
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert set(log[0]["mean_macs_by_placement"]) == {"parallel", "sequential"} and "skip_rates" in log[0]
    assert (out / "steps.jsonl").exists()
    assert all(0 < log[0]["mac_fraction_train_images"][k] <= 1.01 for k in ("eval", "training"))  # the controller's gap
    assert [r["gates_frozen"] for r in log] == [False, True]  # frozen at 75% by default: no more calibration
    assert "mac_fraction_train_images" not in log[1] and log[1]["penalty_strength"] == 0.0
    lc = lcsurgery.convert(create_model(TINY), "sequential")
    lc.load_state_dict(torch.load(out / "model.pt", weights_only=True))  # weights only, no pickled code
    state = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "controller", "rng", "epoch"} <= set(state)


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "lcsurgery.cli", "finetune", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)


@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    args = ["--model", TINY, "--data", "synthetic:1200", "--test-subset", "100", "--batch-size", "20", "--epochs", "4", "--budget", "0.6", "--seed", "3"]
    straight = _run_cli([*args, "--out", str(tmp_path / "straight")])
    assert straight.wait(timeout=600) == 0
    killed = _run_cli([*args, "--out", str(tmp_path / "killed")])
    last = tmp_path / "killed" / "last.pt"
    deadline = time.time() + 600
    while not last.exists() and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = torch.load(last, weights_only=True)["epoch"]
    assert 1 <= done < 4, "the run must be killed mid-way for this test to mean something"
    resumed = _run_cli([*args, "--out", str(tmp_path / "killed"), "--resume"])
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text()) == json.loads((tmp_path / "killed" / "metrics.json").read_text())


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    common = ["--model", TINY, "--data", "synthetic:320", "--test-subset", "40", "--epochs", "1", "--budget", "0.7", "--gate-noise", "0", "--seed", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lcsurgery.cli", "finetune", *common, "--batch-size", "8", "--out", str(tmp_path / "ddp")],
        env=env, capture_output=True, timeout=600,
    )  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr.decode()[-3000:]
    assert main(["finetune", *common, "--batch-size", "16", "--out", str(tmp_path / "single")]) == 0
    a = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "single" / "model.pt", weights_only=True)
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["ranks_identical"] is True
    assert set(a) == set(b)
    worst = max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-8)) for k in a)
    assert worst < 1e-4


def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_model(tmp_path):
    """A NaN loss must stop the run, not train on (a 20-epoch budget run once went on with NaN
    for three epochs, and wrote its NaN model over the last good checkpoint every epoch)."""
    out = tmp_path / "run"
    cfg = FinetuneConfig(model=TINY, data="synthetic:400", test_subset=100, batch_size=40, budget=0.7, placement="sequential", epochs=2, lr=1e30, out=str(out))
    with pytest.raises(lcsurgery.LCSurgeryError, match=r"training diverged: the loss is (nan|inf) at step \d+ \(epoch 1\).*holds nothing yet.*lower --lr"):
        finetune(cfg)
    assert not any((out / f).exists() for f in ("last.pt", "model.pt", "metrics.json"))


def test_a_run_off_its_budget_says_so_last_and_in_metrics(tmp_path, monkeypatch, capsys):
    """Wherever the controller leaves a run, metrics.json records the relative error, and a run more
    than 5% off ends with a warning that says so; a gated run from random weights is warned about first."""
    from lcsurgery.train import loop

    real = loop.evaluate

    def off_budget(*args, **kwargs):
        metrics = real(*args, **kwargs)
        return {**metrics, "mean_macs": 0.8 * metrics["dense_macs"], "mac_fraction": 0.8}

    monkeypatch.setattr(loop, "evaluate", off_budget)
    metrics = finetune(FinetuneConfig(model=TINY, data="synthetic:200", test_subset=40, batch_size=40, epochs=1, budget=0.5, out=str(tmp_path / "run")))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["budget_error"] == pytest.approx(0.6) and saved["budget_met"] is False and metrics == saved
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("warning: fine-tuning gates on a model with random weights")
    assert err[-1].startswith("warning: the run ended at 0.800 of the dense MACs for a budget of 0.5 (+60.0%, more than 5% off)")


def test_budget_report_reads_the_relative_error():
    from lcsurgery.train.budget import budget_report

    assert budget_report(0.52, 0.5) == {"budget_error": 0.04, "budget_met": True}
    assert budget_report(0.47, 0.5) == {"budget_error": -0.06, "budget_met": False}
