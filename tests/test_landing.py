"""``land``: when the gates freeze off budget, whole gates are flipped, nearest their threshold first."""

from __future__ import annotations

import pytest
import torch
from zoo import example, original, randomize_gates

import lcsurgery
from lcsurgery.train.budget import land


def _model(static: bool) -> lcsurgery.LCModel:
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential", static=static).eval()
    randomize_gates(lc, seed=2)
    return lc


IMAGES = [example("cifar.resnet20", batch=32, seed=s) for s in range(4)]


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("direction", ["close", "open"])
def test_flips_only_whole_gates_towards_the_budget(static, direction):
    lc = _model(static)
    before = lcsurgery.count_macs(lc, IMAGES).ratio
    budget = before * (0.8 if direction == "close" else 1.25)
    biases = {n: p.detach().clone() for n, p in lc.named_parameters() if n.endswith(".bias") and n.startswith("lc_gates.")}
    weights = {n: p.detach().clone() for n, p in lc.named_parameters() if n.endswith(".weight") and n.startswith("lc_gates.")}
    result = land(lc, IMAGES, budget, "sequential")
    after = lcsurgery.count_macs(lc, IMAGES).ratio
    assert result.before == pytest.approx(before) and result.after == pytest.approx(after)
    assert abs(after - budget) < abs(before - budget) / 3  # much closer (L-gates move the cost in block-sized steps)
    changed = {n: (p.detach() != biases[n]) for n, p in lc.named_parameters() if n in biases}
    assert sum(int(c.sum()) for c in changed.values()) == result.closed + result.opened > 0
    assert (result.closed > 0) == (direction == "close") and (result.opened > 0) == (direction == "open")
    assert all(torch.equal(p, weights[n]) for n, p in lc.named_parameters() if n in weights)
    for n, p in lc.named_parameters():  # a closed gate went down, an opened one up
        if n in biases and changed[n].any():
            delta = (p.detach() - biases[n])[changed[n]]
            assert (delta < 0).all() if direction == "close" else (delta > 0).all()


def test_a_model_within_two_percent_is_left_alone():
    lc = _model(static=False)
    before = lcsurgery.count_macs(lc, IMAGES).ratio
    state = {k: v.clone() for k, v in lc.state_dict().items()}
    result = land(lc, IMAGES, before * 1.015, "sequential")
    assert (result.closed, result.opened) == (0, 0) and all(torch.equal(v, state[k]) for k, v in lc.state_dict().items())
    lc.train()
    land(lc, IMAGES, 0.2, "sequential")
    assert lc.training  # the mode is restored


def test_channel_gates_land_where_the_least_sure_gate_would_skip_a_whole_block():
    lc = lcsurgery.convert(original("cifar.resnet20"), "parallel", static=True).eval()
    torch.manual_seed(0)
    blocks = lcsurgery.gated_blocks(lc)
    with torch.no_grad():
        for b in blocks:
            b.l_net.bias.fill_(0.01)  # every block on, and its layer gate the least sure of all gates
            b.c_net.bias.copy_(torch.empty_like(b.c_net.bias).uniform_(0.1, 2.0))
    before = lcsurgery.count_macs(lc, IMAGES, "parallel").ratio
    budget = before * 0.96
    result = land(lc, IMAGES, budget, "parallel")
    assert result.after == pytest.approx(lcsurgery.count_macs(lc, IMAGES, "parallel").ratio)
    assert abs(result.after / budget - 1) <= 0.02 and result.closed > 0
    assert all(float(b.l_net.bias.detach()) == pytest.approx(0.01) for b in blocks)  # no block was skipped to get there
