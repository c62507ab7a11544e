"""Static gates (``convert(static=True)``, ``finetune --static``): the baseline of one mask for every image."""

from __future__ import annotations

import pytest
import torch
from zoo import example, original, randomize_gates

import lcsurgery


@pytest.mark.parametrize("name", ["cifar.resnet20", "tv.resnet18", "tv.mobilenet_v2"])
def test_static_gates_ignore_the_image_in_every_execution(name):
    """Whatever weights the gate layers hold (here random, as a dynamic checkpoint would load),
    a static model takes one decision for all images, and skipping equals masked execution."""
    size = 32 if name.startswith("cifar") else 64
    lc = lcsurgery.convert(original(name), "sequential", input_size=(3, size, size), static=True).eval()
    randomize_gates(lc, seed=1)
    x = example(name, batch=6, seed=3)
    report = lcsurgery.count_macs(lc, x)
    assert report.dynamics()["distinct_patterns"] == 1 and report.dynamics()["conditional_gates"] == 0.0
    assert len(set(report.per_sample.tolist())) == 1
    with torch.no_grad():
        skipped = lc(x)
        lc.execution = "masked"
        masked = lc(x)
    assert torch.allclose(skipped, masked, atol=1e-4 * float(masked.abs().max()))


def test_the_same_gates_reading_the_image_take_several_patterns():
    x = example("cifar.resnet20", batch=6, seed=3)
    dynamic = lcsurgery.convert(original("cifar.resnet20"), "sequential").eval()
    randomize_gates(dynamic, seed=1)
    assert lcsurgery.count_macs(dynamic, x).dynamics()["distinct_patterns"] > 1


def test_static_gate_weights_do_not_learn():
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential", static=True).train()
    lc(example("cifar.resnet20", batch=4)).sum().backward()
    for b in lcsurgery.gated_blocks(lc):
        for lin in (b.l_net, b.c_net):
            assert not lin.weight.requires_grad and lin.weight.grad is None
            assert lin.bias.requires_grad and lin.bias.grad is not None
    assert lc.lc_config["static"] is True


@pytest.mark.parametrize("static", ["layers", "channels"])
@pytest.mark.parametrize("execution", ["skip", "masked"])
def test_one_static_gate_kind_ignores_the_image_while_the_other_reads_it(static, execution):
    lc = lcsurgery.convert(original("cifar.resnet20"), "sequential", static=static).eval()
    randomize_gates(lc, seed=1)
    lc.execution = execution
    x = example("cifar.resnet20", batch=6, seed=3)
    with torch.no_grad():
        lc(x)
    fixed, free = ("z_l", "z_c") if static == "layers" else ("z_c", "z_l")
    blocks = lcsurgery.gated_blocks(lc)
    assert all(torch.equal(getattr(b.last, fixed), getattr(b.last, fixed)[:1].expand_as(getattr(b.last, fixed))) for b in blocks)
    assert any(not torch.equal(getattr(b.last, free), getattr(b.last, free)[:1].expand_as(getattr(b.last, free))) for b in blocks)
    fixed_net, free_net = ("l_net", "c_net") if static == "layers" else ("c_net", "l_net")
    assert all(not getattr(b, fixed_net).weight.requires_grad and getattr(b, free_net).weight.requires_grad for b in blocks)
    assert lc.lc_config["static"] == static


def test_static_skipping_equals_masked_execution_for_each_kind():
    x = example("cifar.resnet20", batch=6, seed=3)
    for static in ("layers", "channels"):
        lc = lcsurgery.convert(original("cifar.resnet20"), "sequential", static=static).eval()
        randomize_gates(lc, seed=4)
        with torch.no_grad():
            skipped = lc(x)
            lc.execution = "masked"
            masked = lc(x)
        assert torch.allclose(skipped, masked, atol=1e-4 * float(masked.abs().max()))


def test_static_option_errors():
    with pytest.raises(ValueError, match="static must be one of"):
        lcsurgery.convert(original("cifar.resnet20"), static="blocks")
    with pytest.raises(ValueError, match="does not add"):
        lcsurgery.convert(original("cifar.resnet20"), channels=False, static="channels")


def test_static_channels_keep_one_channel_mask_while_layer_gates_learn_per_image(tmp_path):
    from lcsurgery.train import FinetuneConfig, finetune
    from lcsurgery.train.run_folder import load_run

    cfg = FinetuneConfig(
        model="cifar:resnet20", data="synthetic:200", test_subset=50, batch_size=50, epochs=1, budget=0.5, placement="sequential",
        static_channels=True, gate_input_momentum=0.05, per_image_loss="difficulty", out=str(tmp_path / "run"),
    )
    finetune(cfg)
    lc, loaded, _ = load_run(tmp_path / "run")
    assert loaded.static_channels and lc.lc_config["static"] == "channels"
    blocks = lcsurgery.gated_blocks(lc)
    assert all(not b.c_net.weight.any() for b in blocks if b.c_net is not None)  # bias only: the same channels for every image
    assert any(b.l_net.weight.any() for b in blocks)  # the layer gates learnt to read the image
    with pytest.raises(lcsurgery.LCSurgeryError, match="--static-channels"):
        FinetuneConfig(model="cifar:resnet20", static=True, static_channels=True)
    with pytest.raises(lcsurgery.LCSurgeryError, match="--static-channels"):
        FinetuneConfig(model="cifar:resnet20", gates="layer", static_channels=True)
