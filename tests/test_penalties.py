"""Gate penalties: gate_l1 and macs_penalty values, what they train, and their cost weights."""

from __future__ import annotations

import math

import torch
from zoo import example, original, randomize_gates

import lcsurgery
from lcsurgery.layers.relu1 import leaky_relu1
from lcsurgery.train.regularize import gate_l1, macs_penalty


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
