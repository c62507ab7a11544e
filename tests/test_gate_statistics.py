"""The gates' standardised input: running statistics of training batches only."""

from __future__ import annotations

import torch
from zoo import example, original

import lcsurgery


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
