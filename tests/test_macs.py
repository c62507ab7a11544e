"""Dynamic MAC accounting: exact against physically sliced networks, known totals, clear errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from oracles import SLICERS, conv_fc_macs
from zoo import ZOO_BY_NAME, example, original, randomize_gates

import lcsurgery
from lcsurgery.models.cifar_resnet import resnet20, resnet56


def _convert(name: str, placement: str) -> lcsurgery.LCModel:
    size = ZOO_BY_NAME[name].size
    return lcsurgery.convert(original(name), placement, input_size=(3, size, size)).eval()


def _force_random(lc, seed: int) -> None:
    """Input-independent random patterns set through gated_blocks: blocks on/off, channels on/off."""
    g = torch.Generator().manual_seed(seed)
    for blk in lcsurgery.gated_blocks(lc):
        blk.force(keep=bool(torch.rand(1, generator=g) < 0.6), channels=torch.rand(blk.gated_channels, generator=g) < 0.5)


@pytest.mark.parametrize("patterns", ["forced", "input-dependent"])
@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", list(SLICERS))
def test_per_sample_equals_physically_sliced_network(name, placement, patterns):
    lc = _convert(name, placement)
    if patterns == "forced":
        _force_random(lc, seed=7)
    else:
        randomize_gates(lc, seed=11)
    images = example(name, batch=3, seed=5)
    report = lcsurgery.count_macs(lc, images)
    skipped = 0
    for i in range(len(images)):
        x = images[i : i + 1]
        with torch.no_grad():
            out = lc(x)  # leaves this image's decisions in the gate records
            sliced = SLICERS[name](original(name), lc, placement == "sequential").eval()
            assert torch.allclose(sliced(x), out, rtol=1e-4, atol=1e-4 * out.abs().max())
        assert int(report.per_sample[i]) == conv_fc_macs(sliced, x)
        skipped += int((~report.keep[i]).sum())
    assert skipped > 0 and bool((report.active < torch.tensor([b.gated_channels for b in lc.lc_blocks()])).any())


def test_placements_differ_only_in_first_convs_of_kept_blocks():
    lc = _convert("tv.resnet50", "sequential")
    _force_random(lc, seed=2)
    x = example("tv.resnet50", batch=2)
    seq, par = lcsurgery.count_macs(lc, x), lcsurgery.count_macs(lc, x, placement="parallel")
    costs = lcsurgery.static_costs(lc, (3, 64, 64))
    gap = sum(
        int(seq.keep[0, j]) * c.first * (c.channels - int(seq.active[0, j])) // c.channels for j, c in enumerate(costs.blocks)
    )
    assert int(par.per_sample[0] - seq.per_sample[0]) == gap > 0
    assert torch.equal(seq.keep, par.keep) and torch.equal(seq.active, par.active)


@pytest.mark.parametrize(
    "factory,size,conv_fc,fvcore",
    [
        (torchvision.models.resnet50, 224, 4_089_184_256, 4_111_512_576),
        (resnet56, 32, 125_485_696, None),
        (resnet20, 32, 40_551_040, None),
    ],
    ids=["tv.resnet50@224", "resnet56@32", "resnet20@32"],
)
def test_known_dense_totals(factory, size, conv_fc, fvcore):
    model = factory().eval()
    lc = lcsurgery.convert(model, input_size=(3, size, size)).eval()
    x = torch.randn(1, 3, size, size)
    report = lcsurgery.count_macs(lc, x)
    assert report.dense == conv_fc == conv_fc_macs(model, x)
    assert report.open - report.dense == sum(b.gate for b in report.by_block.values()) > 0
    assert int(report.per_sample[0]) == report.open  # gates open at init: dense work plus the gates
    if fvcore is not None:
        assert lcsurgery.count_macs(lc, x, counting="fvcore").dense == fvcore  # BatchNorm and pooling included


def test_last_macs_matches_count_macs_without_a_second_forward():
    lc = _convert("cifar.resnet20", "sequential")
    randomize_gates(lc, seed=4)
    x = example("cifar.resnet20", batch=6)
    report = lcsurgery.count_macs(lc, x)
    calls = []
    lc.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        lc(x)
    before = len(calls)
    assert torch.equal(lcsurgery.last_macs(lc), report.per_sample)
    assert torch.equal(lcsurgery.last_macs(lc, "parallel"), lcsurgery.count_macs(lc, x, "parallel").per_sample)
    assert len(calls) == before + 1  # only count_macs ran the model again
    lc.train()
    lc(x)  # training: soft gates, but last_macs reports the hard decisions of the same logits
    train_macs = lcsurgery.last_macs(lc)
    assert train_macs.shape == (6,) and bool((train_macs < report.dense).all())


def test_report_numbers_and_summary():
    lc = _convert("cifar.resnet20", "sequential")
    blocks = lcsurgery.gated_blocks(lc)
    for i, blk in enumerate(blocks):
        blk.force(keep=i % 2 == 0, channels=torch.arange(blk.gated_channels) < blk.gated_channels // 2)
    report = lcsurgery.count_macs(lc, example("cifar.resnet20", batch=4))
    assert torch.equal(report.per_sample, report.per_sample[:1].expand(4))
    assert report.mean == float(report.per_sample[0]) and report.ratio == report.mean / report.dense
    b0, b1 = report.by_block["layer1.0"], report.by_block["layer1.1"]
    assert (b0.skip_rate, b0.active_fraction, b1.skip_rate) == (0.0, 0.5, 1.0)
    assert b1.mean == b1.gate  # skipped, identity shortcut: only the gate is paid
    text = report.summary()
    assert "dense model" in text and "40.55M" in text and "layer1.1" in text and "100.0%" in text and "50.0%" in text


def test_loader_input_keeps_labels_and_masks():
    lc = _convert("cifar.resnet20", "parallel")
    randomize_gates(lc, seed=1)
    x = example("cifar.resnet20", batch=10)
    y = torch.arange(10)
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    report = lcsurgery.count_macs(lc, loader, keep_masks=True)
    assert torch.equal(report.labels, y)
    assert torch.equal(report.per_sample, lcsurgery.count_macs(lc, x).per_sample)
    assert report.masks["layer3.2"].shape == (10, 64)
    assert torch.equal(report.masks["layer3.2"].sum(1), report.active[:, -1])


class TestBadInput:
    def test_training_mode(self):
        lc = _convert("cifar.resnet20", "parallel").train()
        with pytest.raises(lcsurgery.LCSurgeryError, match=r"needs the model in eval mode.*no gate is exactly 0.*last_macs"):
            lcsurgery.count_macs(lc, example("cifar.resnet20"))

    def test_wrong_rank(self):
        with pytest.raises(lcsurgery.LCSurgeryError, match=r"\[batch, channels, height, width\], got a 3-D tensor"):
            lcsurgery.count_macs(_convert("cifar.resnet20", "parallel"), torch.randn(3, 32, 32))

    def test_wrong_channels(self):
        with pytest.raises(lcsurgery.LCSurgeryError, match="takes 3-channel images, got 1 channels"):
            lcsurgery.count_macs(_convert("cifar.resnet20", "parallel"), torch.randn(2, 1, 32, 32))

    def test_not_converted(self):
        with pytest.raises(lcsurgery.LCSurgeryError, match="expected a model converted by lcsurgery.convert"):
            lcsurgery.count_macs(original("cifar.resnet20"), example("cifar.resnet20"))

    def test_unknown_counting_and_placement(self):
        lc = _convert("cifar.resnet20", "parallel")
        with pytest.raises(ValueError, match="counting must be one of"):
            lcsurgery.count_macs(lc, example("cifar.resnet20"), counting="flops")
        with pytest.raises(ValueError, match="placement must be"):
            lcsurgery.count_macs(lc, example("cifar.resnet20"), placement="both")

    def test_last_macs_before_any_forward(self):
        with pytest.raises(lcsurgery.LCSurgeryError, match="has not run a forward pass yet"):
            lcsurgery.last_macs(_convert("cifar.resnet20", "parallel"))


def test_dynamics_count_patterns_and_conditional_gates_exactly():
    """The report's dynamic-ness equals what the explicit per-image masks say: distinct on/off
    vectors, and the share of gates on for 5-95% of the images."""
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential").eval()
    randomize_gates(lc, seed=4)
    x = example("cifar.resnet20", batch=40, seed=5)
    report = lcsurgery.count_macs(lc, x, keep_masks=True, batch_size=16)
    blocks = lcsurgery.gated_blocks(lc)
    columns = []
    for j, b in enumerate(blocks):
        columns += [report.keep[:, j : j + 1], report.masks[b.name] & report.keep[:, j : j + 1]]
    on = torch.cat(columns, 1)
    dyn = report.dynamics()
    assert dyn["distinct_patterns"] == len(torch.unique(on, dim=0))
    rates = on.double().mean(0)
    assert dyn["conditional_gates"] == pytest.approx(float(((rates > 0.05) & (rates < 0.95)).double().mean()))
    frac = report.per_sample.double() / report.dense
    assert dyn["mac_fraction"]["p90"] == pytest.approx(float(torch.quantile(frac, 0.9)))
    assert dyn["mac_fraction"]["min"] == pytest.approx(float(frac.min())) and dyn["images"] == 40
    assert "distinct gate patterns" in report.summary() and "conditional" in report.summary()
    assert report.with_placement("parallel").dynamics()["distinct_patterns"] == dyn["distinct_patterns"]  # same decisions
