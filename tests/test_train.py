"""Fine-tuning: penalties, optimiser groups, the budget controller, the CLI, resume, torchrun."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from zoo import example, original, randomize_gates

import lcsurgery
from lcsurgery.cli import main
from lcsurgery.models.cifar_resnet import resnet56
from lcsurgery.models.factory import create_model
from lcsurgery.bench.tradeoff import _runs as _tradeoff_runs
from lcsurgery.train.budget import BudgetController
from lcsurgery.data.loaders import make_loaders, normalization
from lcsurgery.data.sources import load_arrays
from lcsurgery.train import loop
from lcsurgery.train.loop import FinetuneConfig, _cost_gap, build_model, build_teacher, distill_loss, finetune, make_optimizer, make_scheduler, noise_factor
from lcsurgery.train.optim import param_groups
from lcsurgery.layers.relu1 import leaky_relu1
from lcsurgery.train.regularize import gate_l1, macs_penalty

TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
FAST = ["--data", "synthetic:400", "--test-subset", "100", "--batch-size", "40", "--epochs", "2"]


def _trained_forward(seed: int = 0) -> lcsurgery.LCModel:
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential").train()
    randomize_gates(lc, seed=seed)
    lc(example("cifar.resnet20", batch=8))
    return lc


class TestPenalties:
    def test_gate_l1_is_one_with_open_gates_and_depth_independent(self):
        for name in ("cifar.resnet20", "tv.resnet50"):
            size = 32 if name.startswith("cifar") else 64
            lc = lcsurgery.convert(original(name), input_size=(3, size, size)).train()
            lc(example(name, batch=2))
            assert torch.allclose(gate_l1(lc), torch.tensor(1.0))
            assert torch.allclose(gate_l1(lc, cost_aware=True), torch.tensor(1.0))

    def test_gate_l1_is_the_mean_gate_value(self):
        lc = _trained_forward()
        expected = []
        for b in lcsurgery.gated_blocks(lc):
            expected += [leaky_relu1(z, b.slope).clamp(min=-b.slope).mean() for z in (b.last.z_l, b.last.z_c)]
        assert torch.allclose(gate_l1(lc), torch.stack(expected).mean(), atol=1e-6)

    def test_penalties_train_the_gates_only(self):
        lc = _trained_forward()
        for penalty in (gate_l1(lc, cost_aware=True), macs_penalty(lc)):
            lc.zero_grad()
            penalty.backward()
            grads = {n: p.grad for n, p in lc.named_parameters()}
            assert all(g is None or not g.any() for n, g in grads.items() if not n.startswith("lc_gates."))
            assert any(g is not None and g.any() for n, g in grads.items() if n.startswith("lc_gates."))

    def test_macs_penalty_value_is_the_hard_cost(self):
        lc = _trained_forward(seed=3)
        dense = lcsurgery.static_costs(lc, (3, 32, 32)).dense
        for placement in ("parallel", "sequential"):
            value = macs_penalty(lc, placement)
            assert math.isclose(float(value), float(lcsurgery.last_macs(lc, placement).double().mean()) / dense, rel_tol=1e-6)

    def test_cost_aware_weights_follow_the_placement(self):
        lc = _trained_forward()
        lc.zero_grad()
        gate_l1(lc, cost_aware=True, placement="sequential").backward()
        seq = lc.lc_gates.layer1_1.c_net.bias.grad.abs().sum()
        lc.zero_grad()
        gate_l1(lc, cost_aware=True, placement="parallel").backward()
        par = lc.lc_gates.layer1_1.c_net.bias.grad.abs().sum()
        assert seq > par > 0  # sequential: a channel also trims the first conv, so it matters more


def test_param_groups():
    lc = lcsurgery.convert(original("cifar.resnet20"))
    backbone, gates = param_groups(lc, lr=0.01, gate_lr=0.003)
    assert (backbone["lr"], backbone["weight_decay"], gates["lr"], gates["weight_decay"]) == (0.01, 5e-4, 0.003, 0.0)
    gate_ids = {id(p) for p in gates["params"]}
    assert gate_ids == {id(p) for n, p in lc.named_parameters() if n.startswith("lc_gates.")}
    assert len(backbone["params"]) + len(gates["params"]) == len(list(lc.parameters()))
    opt = torch.optim.SGD(param_groups(lc, lr=5e-3), momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert opt.param_groups[1]["lr"] == 5e-3 * 10


class TestBudgetController:
    def test_strength_rises_above_target_and_falls_below(self):
        c = BudgetController(0.5, ramp=0.0)
        up = [c.update(0.9, i / 500) for i in range(50)][-1]
        assert up > 1.0
        down = [c.update(0.1, (50 + i) / 500) for i in range(200)][-1]
        assert down < up

    def test_penalty_is_continuous_at_the_budget(self):
        """A hair above or below the target, the penalty is nearly the same: no chatter between a
        full closing push and none (the gates of a 20-epoch run chattered between the two)."""
        def after_ramp(fraction: float) -> float:
            c = BudgetController(0.5, ramp=0.5, smoothing=0.0, strength=10.0)
            return c.update(fraction, progress=0.8) / c.strength  # the multiplier over the controller's strength

        above, below = after_ramp(0.5005), after_ramp(0.4995)
        assert above == 1.0
        assert below == pytest.approx(above, rel=0.05)
        assert after_ramp(0.49) > 0 > after_ramp(0.48)  # eases off first, reopens further under
        assert after_ramp(0.30) == pytest.approx(-1.0, rel=0.01)

    def test_target_ramps_from_dense_to_budget(self):
        c = BudgetController(0.4, ramp=0.5)
        targets = []
        for p in (0.0, 0.25, 0.5, 0.9):
            c.update(0.9, progress=p)
            targets.append(c.current_target)
        assert targets == pytest.approx([1.0, 0.7, 0.4, 0.4])

    def test_calibration_shifts_the_training_target(self):
        c = BudgetController(0.5, ramp=0.0, smoothing=0.0)
        c.update(0.48, 0.1)
        c.calibrate(0.53, 0.48)  # eval costs 0.05 more than the training batches
        assert c.train_target == pytest.approx(0.45)

    def test_state_roundtrip(self):
        c = BudgetController(0.5)
        for f in (0.9, 0.8, 0.7):
            c.update(f, progress=0.1)
        d = BudgetController(0.5)
        d.load_state_dict(c.state_dict())
        assert d.update(0.6, 0.2) == c.update(0.6, 0.2)

    @pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
    def test_budget_outside_unit_interval(self, bad):
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            BudgetController(bad)


def test_cli_defaults_are_the_config_defaults():
    """``lcsurgery finetune`` and ``FinetuneConfig`` agree on every default (one source: the config),
    and the benchmark's parser takes them too without touching its own ``--out``."""
    import argparse

    from lcsurgery.cli import bench as bench_cli
    from lcsurgery.cli import finetune as finetune_cli

    p = argparse.ArgumentParser()
    finetune_cli.add_arguments(p)
    args = vars(p.parse_args(["--model", "cifar:resnet20"]))
    assert FinetuneConfig(**{k: v for k, v in args.items() if k in FinetuneConfig.__dataclass_fields__}) == FinetuneConfig(model="cifar:resnet20")
    assert set(FinetuneConfig.__dataclass_fields__) - set(args) == {"momentum"}  # the one option the CLI does not expose
    b = argparse.ArgumentParser()
    bench_cli.add_arguments(b)
    tr = vars(b.parse_args(["tradeoff", "--model", "cifar:resnet20"]))
    assert tr["out"] == "runs/tradeoff" and tr["lr"] == FinetuneConfig.lr and tr["budget_ramp"] == FinetuneConfig.budget_ramp


@pytest.mark.parametrize("gates", ["layer", "channel"])
def test_gates_option_builds_only_those_gates(gates):
    lc = build_model(FinetuneConfig(model="cifar:resnet20", gates=gates), 10)
    blocks = lcsurgery.gated_blocks(lc)
    assert len(blocks) == 9
    assert all((b.l_net is not None) == (gates == "layer") and (b.c_net is not None) == (gates == "channel") for b in blocks)


class TestCliErrors:
    def _err(self, capsys, args) -> str:
        assert main(["finetune", *args]) == 2
        return capsys.readouterr().err

    def test_unknown_gate_kind(self, capsys, tmp_path):
        with pytest.raises(lcsurgery.LCSurgeryError, match="--gates must be one of layer\\+channel, layer, channel, got 'both'"):
            FinetuneConfig(model="cifar:resnet20", gates="both")
        with pytest.raises(SystemExit):
            main(["finetune", "--model", "cifar:resnet20", "--gates", "both", "--out", str(tmp_path / "a")])
        assert "invalid choice: 'both'" in capsys.readouterr().err

    def test_unknown_model_spec(self, capsys, tmp_path):
        assert "unknown model spec 'resnet99'" in self._err(capsys, ["--model", "resnet99", "--out", str(tmp_path / "a")])

    def test_missing_data(self, capsys, tmp_path):
        err = self._err(capsys, ["--model", "cifar:resnet20", "--data", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "a")])
        assert "does not exist" in err

    def test_checkpoint_of_another_architecture(self, capsys, tmp_path):
        ckpt = tmp_path / "r56.pt"
        torch.save(resnet56().state_dict(), ckpt)
        err = self._err(capsys, ["--model", "cifar:resnet20", "--checkpoint", str(ckpt), *FAST, "--out", str(tmp_path / "a")])
        assert "checkpoint does not fit" in err and "unexpected" in err

    @pytest.mark.parametrize("budget", ["0", "1.2"])
    def test_budget_outside_unit_interval(self, capsys, tmp_path, budget):
        err = self._err(capsys, ["--model", TINY, "--budget", budget, *FAST, "--out", str(tmp_path / "a")])
        assert "must be in (0, 1]" in err

    @pytest.mark.parametrize("ramp", ["0", "1.5"])
    def test_budget_ramp_outside_unit_interval(self, capsys, tmp_path, ramp):
        assert "--budget-ramp is a share of training in (0, 1)" in self._err(capsys, ["--model", TINY, *FAST, "--budget", "0.5", "--budget-ramp", ramp, "--out", str(tmp_path / "a")])

    @pytest.mark.parametrize("freeze", ["0.5", "1.2"])
    def test_freeze_gates_outside_ramp_to_end(self, capsys, tmp_path, freeze):
        err = self._err(capsys, ["--model", TINY, *FAST, "--budget", "0.5", "--freeze-gates", freeze, "--out", str(tmp_path / "a")])
        assert f"--freeze-gates is the share of training after which the gates stop learning and must be in (--budget-ramp, 1] = (0.5, 1], got {freeze}" in err

    def test_freeze_gates_follows_the_ramp_by_default(self):
        assert FinetuneConfig(model=TINY).freeze_gates == 0.75
        assert FinetuneConfig(model=TINY, budget_ramp=0.8).freeze_gates == pytest.approx(0.9)  # a long ramp alone is no error
        assert FinetuneConfig(model=TINY, freeze_gates=None).freeze_gates is None

    def test_teacher_errors(self, capsys, tmp_path):
        assert "needs starting weights" in self._err(capsys, ["--model", TINY, *FAST, "--teacher", "start", "--out", str(tmp_path / "a")])
        err = self._err(capsys, ["--model", TINY, *FAST, "--teacher", str(tmp_path / "no-run"), "--out", str(tmp_path / "b")])
        assert f"no weights at {tmp_path / 'no-run'}" in err
        assert "drop --dense or --teacher" in self._err(capsys, ["--model", TINY, *FAST, "--dense", "--teacher", "start", "--out", str(tmp_path / "c")])
        ckpt = tmp_path / "r56.pt"
        torch.save(resnet56().state_dict(), ckpt)
        err = self._err(capsys, ["--model", "cifar:resnet20", *FAST, "--teacher", str(ckpt), "--out", str(tmp_path / "d")])
        assert "checkpoint does not fit" in err
        assert not any(tmp_path.joinpath(n).exists() for n in "abcd")  # a bad start leaves --out alone

    def test_out_is_not_overwritten_without_force_and_resume_checks_the_config(self, capsys, tmp_path):
        out = str(tmp_path / "run")
        args = ["--model", TINY, *FAST, "--epochs", "1", "--budget", "0.8", "--out", out]
        assert main(["finetune", *args]) == 0
        capsys.readouterr()
        before = (Path(out) / "model.pt").read_bytes()
        assert "already holds a run" in self._err(capsys, args)
        assert (Path(out) / "model.pt").read_bytes() == before
        err = self._err(capsys, [*args[:-2], "--budget", "0.5", "--out", out, "--resume"])
        assert "cannot resume" in err and "budget: 0.8 -> 0.5" in err
        assert main(["finetune", *args, "--force"]) == 0


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


def test_wide_gates_move_at_a_narrow_gates_pace():
    """One Adam step moves a gate logit by about lr x (width-scaled) L1 norm of its input: equal across widths."""
    lc = lcsurgery.convert(original("tv.resnet50"), "sequential", input_size=(3, 64, 64)).train()
    opt = make_optimizer(lc, FinetuneConfig(model="tv", gate_lr=0.01), steps=100)
    x = example("tv.resnet50")
    lc(x)
    pooled = {b.name: b.last.pooled.clone() for b in lcsurgery.gated_blocks(lc)}
    before = {b.name: b.gate_logits(pooled[b.name])[0].detach().clone() for b in lcsurgery.gated_blocks(lc)}
    opt.zero_grad()
    macs_penalty(lc).backward()
    opt.step()
    moves = {}
    for b in lcsurgery.gated_blocks(lc):
        z = b.gate_logits(pooled[b.name])[0].detach()
        moves[b.name] = float((before[b.name] - z).abs().mean()) / (0.01 * (1 + 64 * float(pooled[b.name].abs().mean())))
    assert max(moves.values()) < 1.5  # unscaled, the 2048-wide gates would move ~32x further


@pytest.mark.parametrize("freeze", [None, 0.8])
def test_backbone_rate_decays_and_gate_rate_holds_until_the_freeze(freeze):
    """The gates keep their rate (so the budget controller can still move them) until the freeze, then stop."""
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential")
    opt = make_optimizer(lc, FinetuneConfig(model="cifar:resnet20", lr=0.1, gate_lr=0.01), steps=100)
    sched = make_scheduler(opt, 100, freeze)
    backbone, gates = {}, {}
    for step in range(101):
        backbone[step] = {g["lr"] for g in opt.param_groups if g["name"] == "backbone"}
        gates[step] = {g["lr"] for g in opt.param_groups if g["name"] == "gates"}
        opt.step()
        sched.step()
    assert [backbone[s].pop() for s in (0, 50, 100)] == pytest.approx([0.1, 0.05, 0.0], abs=1e-12)
    assert len([g for g in opt.param_groups if g["name"] == "gates"]) == 2 * len(lcsurgery.gated_blocks(lc)) * 2  # weight and bias of both gate layers
    last_learning = 100 if freeze is None else 79
    assert [gates[s] for s in range(101)] == [{0.01}] * (last_learning + 1) + [{0.0}] * (100 - last_learning)


def test_frozen_gates_stay_fixed_while_the_backbone_trains(tmp_path, monkeypatch):
    """With ``freeze_gates=0.5`` over two epochs, epoch 2 leaves every gate parameter as epoch 1 left it
    and logs no penalty; the gate noise is gone by then too, so training ends on the eval function."""
    saved = []
    real_save = loop._save
    monkeypatch.setattr(loop, "_save", lambda path, obj: (saved.append(copy.deepcopy(obj)) if path.name == "last.pt" else None, real_save(path, obj)))
    cfg = FinetuneConfig(
        model=TINY, data="synthetic:400", test_subset=100, batch_size=40, epochs=2, budget=0.5, budget_ramp=0.25,
        freeze_gates=0.5, gate_input_momentum=0.1, placement="sequential", out=str(tmp_path / "run"),
    )  # fmt: skip
    finetune(cfg)
    first, second = (s["model"] for s in saved)
    gate_keys = [k for k in first if k.startswith("lc_gates.")]
    assert gate_keys and all(torch.equal(first[k], second[k]) for k in gate_keys)  # input statistics included
    assert all(int(first[k]) == 10 for k in gate_keys if k.endswith("input_batches"))  # the 10 batches before the freeze
    assert any(not torch.equal(first[k], second[k]) for k in first if k not in gate_keys and first[k].is_floating_point())
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert all(r["penalty_strength"] == 0.0 for r in steps if r["epoch"] == 2)
    assert any(r["penalty_strength"] != 0.0 for r in steps if r["epoch"] == 1)
    assert noise_factor(0.5, 0.35, 0.5) == 0.0 and noise_factor(0.35, 0.35, 0.5) == 1.0
    assert noise_factor(0.75, 0.5) == 0.0 and noise_factor(0.625, 0.5) == pytest.approx(0.5)  # no freeze: faded by 3/4


def test_gate_input_statistics_track_training_batches_only():
    """The first training batch sets the gates' input mean and 1 / std, later ones move them by the
    momentum; eval leaves them; at zero gate weights (a fresh conversion) they change nothing."""
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential")
    for m in lc.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0  # training-mode passes leave the backbone's running statistics as they are
    block = lcsurgery.gated_blocks(lc)[3]
    block.stats_momentum = 0.25
    pooled = []
    handle = block.register_forward_pre_hook(lambda m, a: pooled.append(a[0].mean((2, 3))))
    x1, x2 = example("cifar.resnet20", batch=8, seed=1), example("cifar.resnet20", batch=8, seed=2)
    with torch.no_grad():
        dense = lc.eval()(x1)
        lc.train()(x1)
        assert torch.allclose(block.input_mean, pooled[-1].mean(0)) and int(block.input_batches) == 1
        assert torch.allclose(block.input_scale, (pooled[-1].var(0, unbiased=False) + 1e-5).rsqrt())
        mean, scale = block.input_mean.clone(), block.input_scale.clone()
        lc(x2)
        assert torch.allclose(block.input_mean, 0.75 * mean + 0.25 * pooled[-1].mean(0))
        assert torch.allclose(block.input_scale, 0.75 * scale + 0.25 * (pooled[-1].var(0, unbiased=False) + 1e-5).rsqrt())
        state = block.input_mean.clone()
        assert torch.equal(lc.eval()(x1), dense)  # zero weights: every gate open whatever the statistics
        assert torch.equal(block.input_mean, state)
        block.l_net.weight.normal_()
        z_l, _ = block.gate_logits(pooled[-1])
        standardised = (pooled[-1] - block.input_mean) * block.input_scale
        assert torch.allclose(z_l, standardised @ block.l_net.weight[0] + block.l_net.bias, atol=1e-5)
    handle.remove()


def test_calibration_images_are_training_images_without_augmentation():
    model = original("cifar.resnet20")
    loaders = make_loaders("synthetic:400", model, 40, test_subset=100)
    mean, std = normalization(model)
    train = load_arrays("synthetic:400", "train")
    plain = (train.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    x, y = next(iter(loaders.calibration))
    match = (x.flatten(1)[:, None] - plain.flatten(1)[None]).abs().amax(-1) < 1e-5  # [batch, train]
    assert match.sum(1).tolist() == [1] * len(x)  # each image is one training image, untouched
    assert torch.equal(train.labels[match.float().argmax(1)], y)
    augmented, _ = next(iter(loaders.train))
    assert ((augmented.flatten(1)[:, None] - plain.flatten(1)[None]).abs().amax(-1) < 1e-5).any(1).float().mean() < 1


def test_cost_gap_measures_both_modes_and_leaves_batchnorm_untouched():
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential")
    randomize_gates(lc, seed=0)
    for b in lcsurgery.gated_blocks(lc):
        b.stats_momentum = 0.1  # as while the gates learn: measuring must not move the gates' input statistics either
    loaders = make_loaders("synthetic:400", lc, 40, test_subset=100)
    before = {k: v.clone() for k, v in lc.state_dict().items()}
    eval_fraction, train_fraction = _cost_gap(lc, loaders, "sequential")
    assert all(torch.equal(before[k], v) for k, v in lc.state_dict().items())  # running stats included
    plain = torch.cat([x for x, _ in loaders.calibration])
    assert eval_fraction == pytest.approx(lcsurgery.count_macs(lc.eval(), plain, progress=False).ratio)
    assert 0 < train_fraction < 1 and train_fraction != eval_fraction


class TestDistillation:
    def test_distill_loss_is_the_tempered_kl_scaled_by_t_squared(self):
        torch.manual_seed(0)
        s, t = torch.randn(6, 10), torch.randn(6, 10)
        p = torch.softmax(t / 4, 1)
        expected = (p * (p.log() - torch.log_softmax(s / 4, 1))).sum(1).mean() * 16
        assert distill_loss(s, t, 4.0) == pytest.approx(float(expected), rel=1e-5)
        assert distill_loss(t, t, 4.0) == pytest.approx(0.0, abs=1e-6)

    def test_start_teacher_is_the_starting_model_frozen(self, tmp_path):
        ckpt = tmp_path / "start.pt"
        torch.manual_seed(1)
        torch.save(create_model(TINY).state_dict(), ckpt)
        cfg = FinetuneConfig(model=TINY, checkpoint=str(ckpt), teacher="start")
        teacher, student = build_teacher(cfg, 10), build_model(cfg, 10).eval()
        x = torch.randn(4, 3, 32, 32)
        assert torch.allclose(teacher(x), student(x), atol=1e-5)  # gates start open: same function
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    def test_tradeoff_gated_runs_distil_from_its_dense_run(self, tmp_path):
        runs = dict(_tradeoff_runs(FinetuneConfig(model=TINY, teacher="dense"), [0.5], tmp_path))
        assert runs["dense"].teacher is None and runs["dense"].dense
        assert {n: r.teacher for n, r in runs.items() if n != "dense"} == {n: str(tmp_path / "dense") for n in ("sequential-50", "parallel-50")}

    def test_weight_zero_is_plain_training_and_a_teacher_changes_the_result(self, tmp_path):
        common = dict(model=TINY, data="synthetic:400", test_subset=100, batch_size=40, epochs=1, seed=2)
        finetune(FinetuneConfig(**common, dense=True, out=str(tmp_path / "dense")))
        common["budget"] = 0.7
        for name, extra in (("plain", {}), ("w0", {"teacher": str(tmp_path / "dense"), "distill_weight": 0.0}), ("w9", {"teacher": str(tmp_path / "dense")})):
            finetune(FinetuneConfig(**common, **extra, out=str(tmp_path / name)))
        plain, w0, w9 = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("plain", "w0", "w9"))
        assert all(torch.equal(plain[k], w0[k]) for k in plain)
        assert any(not torch.allclose(plain[k], w9[k]) for k in plain if plain[k].is_floating_point())


def test_a_diverging_run_stops_with_a_clear_error_and_writes_no_model(tmp_path):
    """A NaN loss must stop the run, not train on (a 20-epoch budget run once went on with NaN
    for three epochs, and wrote its NaN model over the last good checkpoint every epoch)."""
    out = tmp_path / "run"
    cfg = FinetuneConfig(model=TINY, data="synthetic:400", test_subset=100, batch_size=40, budget=0.7, placement="sequential", epochs=2, lr=1e30, out=str(out))
    with pytest.raises(lcsurgery.LCSurgeryError, match=r"training diverged: the loss is (nan|inf) at step \d+ \(epoch 1\).*holds nothing yet.*lower --lr"):
        finetune(cfg)
    assert not any((out / f).exists() for f in ("last.pt", "model.pt", "metrics.json"))
