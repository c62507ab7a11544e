"""What the budget controller calibrates on: plain training images, and the eval/training cost gap."""

from __future__ import annotations

import pytest
import torch
from zoo import original, randomize_gates

import lcsurgery
from lcsurgery.data.loaders import make_loaders, normalization
from lcsurgery.data.sources import load_arrays
from lcsurgery.train.evaluate import cost_gap


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
    eval_fraction, train_fraction = cost_gap(lc, loaders, "sequential")
    assert all(torch.equal(before[k], v) for k, v in lc.state_dict().items())  # running stats included
    plain = torch.cat([x for x, _ in loaders.calibration])
    assert eval_fraction == pytest.approx(lcsurgery.count_macs(lc.eval(), plain, progress=False).ratio)
    assert 0 < train_fraction < 1 and train_fraction != eval_fraction
