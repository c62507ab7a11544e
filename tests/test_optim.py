"""Optimisers and schedules: parameter groups, width-scaled gate steps, the rates over training, frozen gates."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from zoo import example, original

import lcsurgery
from lcsurgery.train import loop, run_folder
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune
from lcsurgery.train.optim import make_optimizer, make_scheduler, param_groups, static_paces
from lcsurgery.train.regularize import macs_penalty
from lcsurgery.train.schedule import noise_factor

TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
FAST = ["--data", "synthetic:400", "--test-subset", "100", "--batch-size", "40", "--epochs", "2"]


def test_param_groups():
    lc = lcsurgery.convert(original("cifar.resnet20"))
    backbone, gates = param_groups(lc, lr=0.01, gate_lr=0.003)
    assert (backbone["lr"], backbone["weight_decay"], gates["lr"], gates["weight_decay"]) == (0.01, 5e-4, 0.003, 0.0)
    gate_ids = {id(p) for p in gates["params"]}
    assert gate_ids == {id(p) for n, p in lc.named_parameters() if n.startswith("lc_gates.")}
    assert len(backbone["params"]) + len(gates["params"]) == len(list(lc.parameters()))
    opt = torch.optim.SGD(param_groups(lc, lr=5e-3), momentum=0.9, nesterov=True, weight_decay=5e-4)
    assert opt.param_groups[1]["lr"] == 5e-3 * 10


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


def _logit_moves(lc, opt, x) -> dict[str, float]:
    """Mean change of each block's gate logits in one Adam step on the MAC penalty."""
    lc(x)
    pooled = {b.name: b.last.pooled.clone() for b in lcsurgery.gated_blocks(lc)}
    before = {b.name: torch.cat([z.reshape(len(x), -1) for z in b.gate_logits(pooled[b.name]) if z is not None], 1).detach().clone() for b in lcsurgery.gated_blocks(lc)}
    opt.zero_grad()
    macs_penalty(lc).backward()
    opt.step()
    after = {b.name: torch.cat([z.reshape(len(x), -1) for z in b.gate_logits(pooled[b.name]) if z is not None], 1).detach() for b in lcsurgery.gated_blocks(lc)}
    return {n: float((before[n] - after[n]).abs().mean()) for n in before}


@pytest.mark.parametrize("name", ["cifar.resnet20", "tv.resnet18"])
def test_static_gates_move_at_an_image_reading_gates_pace(name):
    """A bias-only gate's logit moves by lr x its pace, 1 + the width-scaled L1 norm of its mean pooled
    input: as far as a gate reading the image moves (one rate alone would move it that many times less)."""
    x = example(name)
    dynamic = lcsurgery.convert(original(name), "sequential").train()
    static = lcsurgery.convert(original(name), "sequential", static=True).train()
    paces = static_paces(static, x)
    assert len(paces) == sum(len(b.static_nets()) for b in lcsurgery.gated_blocks(static)) > 0 and min(paces.values()) > 2
    before = copy.deepcopy(static.state_dict())
    static.eval()
    assert static_paces(static, x) == pytest.approx(paces)  # measured on training-mode features whatever the mode
    assert not static.training and all(torch.equal(v, before[k]) for k, v in static.state_dict().items())  # mode and BatchNorm statistics left as they were
    static.train()
    cfg = FinetuneConfig(model="tv", gate_lr=0.01)
    reading = _logit_moves(dynamic, make_optimizer(dynamic, cfg, steps=100), x)
    paced = _logit_moves(static, make_optimizer(static, cfg, steps=100, paces=paces), x)
    for b in lcsurgery.gated_blocks(static):
        pace = paces[id(b.static_nets()[0].bias)]
        assert paced[b.name] == pytest.approx(0.01 * pace, rel=0.05), b.name
        assert 0.5 < paced[b.name] / reading[b.name] < 2.0, b.name


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
    (but for the gates ``land`` flipped to meet the budget) and logs no penalty; the gate noise is gone by then too, so training ends on the eval function."""
    saved = []
    real_save = run_folder.save
    monkeypatch.setattr(loop, "save", lambda path, obj: (saved.append(copy.deepcopy(obj)) if path.name == "last.pt" else None, real_save(path, obj)))
    cfg = FinetuneConfig(
        model=TINY, data="synthetic:400", test_subset=100, batch_size=40, epochs=2, budget=0.5, budget_ramp=0.25,
        freeze_gates=0.5, gate_input_momentum=0.1, placement="sequential", out=str(tmp_path / "run"),
    )  # fmt: skip
    finetune(cfg)
    first, second = (s["model"] for s in saved)
    gate_keys = [k for k in first if k.startswith("lc_gates.")]
    landing = saved[1]["landing"]  # gates flipped to meet the budget when they froze, if any; nothing else moves
    assert saved[0]["landing"] is None and landing["step"] == 10
    flipped = sum(int((first[k] != second[k]).sum()) for k in gate_keys if k.endswith(".bias"))
    assert flipped == landing["closed"] + landing["opened"]
    assert gate_keys and all(torch.equal(first[k], second[k]) for k in gate_keys if not k.endswith(".bias"))  # input statistics included
    assert all(int(first[k]) == 10 for k in gate_keys if k.endswith("input_batches"))  # the 10 batches before the freeze
    assert any(not torch.equal(first[k], second[k]) for k in first if k not in gate_keys and first[k].is_floating_point())
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert all(r["penalty_strength"] == 0.0 for r in steps if r["epoch"] == 2)
    assert any(r["penalty_strength"] != 0.0 for r in steps if r["epoch"] == 1)
    assert noise_factor(0.5, 0.35, 0.5) == 0.0 and noise_factor(0.35, 0.35, 0.5) == 1.0
    assert noise_factor(0.75, 0.5) == 0.0 and noise_factor(0.625, 0.5) == pytest.approx(0.5)  # no freeze: faded by 3/4
