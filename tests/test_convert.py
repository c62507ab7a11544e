"""The surgery over the model zoo: blocks found, exactness at init, gradients, names, checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx
from zoo import ZOO, ZOO_BY_NAME, example, original, randomize_gates

import lcsurgery
from lcsurgery.fx.graph import data_nodes
from lcsurgery.fx.ops import is_add
from lcsurgery.fx.tracer import trace

NAMES = [z.name for z in ZOO]


def _convert(name: str, **kw) -> lcsurgery.LCModel:
    size = ZOO_BY_NAME[name].size
    return lcsurgery.convert(original(name), input_size=(3, size, size), **kw)


def _tensor_adds(name: str) -> int:
    """Independent count: additions of two input-derived tensors in the plain fx graph."""
    graph, _ = trace(copy.deepcopy(original(name)))
    reach = set(data_nodes(graph))
    return sum(1 for n in reach if is_add(n) and all(a in reach for a in n.args))


@pytest.mark.parametrize("name", NAMES)
def test_finds_every_residual_block(name):
    size = ZOO_BY_NAME[name].size
    blocks = lcsurgery.find_blocks(original(name), input_size=(3, size, size))
    assert len(blocks) == ZOO_BY_NAME[name].blocks == _tensor_adds(name)
    assert len({b.name for b in blocks}) == len(blocks)
    for b in blocks:
        assert b.gates in ("layer+channel", "layer")
        if b.gates == "layer+channel":
            assert b.gated_channels > 0 and b.first_conv and b.next_conv


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", NAMES)
def test_exact_at_init(name, placement):
    model = original(name)
    lc = _convert(name, placement=placement).eval()
    x = example(name, batch=3)
    with torch.no_grad():
        ref = model(x)
        scale = ref.abs().max()
        for execution in ("skip", "masked"):
            lc.execution = execution
            assert (lc(x) - ref).abs().max() <= 1e-5 * scale, execution
    for blk in lcsurgery.gated_blocks(lc):
        assert bool(blk.last.keep().all())
        if blk.c_net is not None:
            assert bool(blk.last.active().all()) and torch.equal(blk.last.s_c, torch.ones_like(blk.last.s_c))


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_gets_a_gradient(name):
    lc = _convert(name).train()
    lc(example(name, batch=2)).square().mean().backward()
    missing = [n for n, p in lc.named_parameters() if p.grad is None]
    assert not missing
    gate_grads = [p.grad.abs().sum() for n, p in lc.named_parameters() if n.startswith("lc_gates.")]
    assert gate_grads and all(torch.isfinite(g) for g in gate_grads)
    assert sum(float(g) for g in gate_grads) > 0


@pytest.mark.parametrize("name", NAMES[:4])
def test_gates_send_no_gradient_into_the_backbone(name):
    """The gates read the backbone's features but do not train them: the task loss reaching the
    backbone through a gate input made a 20-epoch ResNet-20 run diverge."""
    lc = _convert(name).train()
    x = example(name, batch=2).requires_grad_(True)
    lc(x)
    gate_values = [s for blk in lcsurgery.gated_blocks(lc) for s in (blk.last.s_l, blk.last.s_c) if s is not None]
    torch.stack([s.sum() for s in gate_values]).sum().backward()
    assert x.grad is None
    assert all(p.grad is None for n, p in lc.named_parameters() if not n.startswith("lc_gates."))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in lc.named_parameters() if n.startswith("lc_gates."))


@pytest.mark.parametrize("name", NAMES)
def test_names_unchanged_and_original_checkpoint_loads(name):
    model = original(name)
    lc = _convert(name)
    own, orig = lc.state_dict(), model.state_dict()
    assert set(orig) <= set(own)
    extra = set(own) - set(orig)
    assert extra and all(k.startswith("lc_gates.") for k in extra)
    fresh = _convert(name)
    result = fresh.load_state_dict(orig, strict=False)
    assert set(result.missing_keys) == extra and not result.unexpected_keys
    assert sorted(lcsurgery.load_weights(fresh, orig).missing_gates) == sorted(extra)


@pytest.mark.parametrize("name", ["tv.resnet18", "tv.mobilenet_v3_large", "timm.convnext_tiny", "timm.efficientnet_b0", "cifar.resnet20"])
def test_converted_checkpoint_roundtrip(name, tmp_path):
    lc = _convert(name, placement="sequential").eval()
    randomize_gates(lc, seed=3)
    path = tmp_path / "lc.pt"
    torch.save(lc.state_dict(), path)
    fresh = _convert(name, placement="sequential").eval()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    x = example(name, batch=4)
    with torch.no_grad():
        assert torch.equal(fresh(x), lc(x))


def test_gated_blocks_in_forward_order():
    lc = _convert("tv.regnet_y_400mf").eval()
    called = []
    for blk in lcsurgery.gated_blocks(lc):
        blk.register_forward_hook(lambda m, i, o: called.append(m.name))
    with torch.no_grad():
        lc(example("tv.regnet_y_400mf"))
    blocks = lcsurgery.gated_blocks(lc)
    assert called == [b.name for b in blocks]
    assert [b.name for b in blocks] == [b.name for b in lcsurgery.find_blocks(original("tv.regnet_y_400mf"), input_size=(3, 64, 64))]
    assert all(isinstance(b.l_net, torch.nn.Linear) and isinstance(b.c_net, torch.nn.Linear) for b in blocks)


def test_find_blocks_reports_channels_and_convs():
    r50 = {b.name: b for b in lcsurgery.find_blocks(original("tv.resnet50"), input_size=(3, 64, 64))}
    assert (r50["layer1.0"].in_channels, r50["layer1.0"].gated_channels) == (64, 64)
    assert (r50["layer3.1"].in_channels, r50["layer3.1"].gated_channels) == (1024, 256)
    assert (r50["layer3.1"].first_conv, r50["layer3.1"].next_conv) == ("layer3.1.conv1", "layer3.1.conv2")
    mnv2 = {b.name: b for b in lcsurgery.find_blocks(original("tv.mobilenet_v2"), input_size=(3, 64, 64))}
    # the gate sits after the depthwise conv: expand 1x1 -> dw 3x3 -> [gate] -> project 1x1
    assert (mnv2["features.3"].gated_channels, mnv2["features.3"].first_conv, mnv2["features.3"].next_conv) == (144, "features.3.conv.0.0", "features.3.conv.2")


@pytest.mark.parametrize("name", ["tv.convnext_tiny", "timm.convnext_tiny"])
def test_convnext_channel_gate_moves_past_layernorm(name):
    blocks = lcsurgery.find_blocks(original(name), input_size=(3, 64, 64))
    first = blocks[0]
    assert first.gated_channels == 4 * first.in_channels  # the MLP's hidden units
    assert first.first_conv.endswith(("block.3", "mlp.fc1")) and first.next_conv.endswith(("block.5", "mlp.fc2"))
    assert "C-Net moved" in first.note and "permute" in first.note


def test_find_blocks_prints_a_table():
    text = str(lcsurgery.find_blocks(original("cifar.resnet20"), input_size=(3, 32, 32)))
    assert "9 residual blocks" in text and "layer2.0" in text and "layer2.0.conv1" in text


def test_user_model_untouched():
    model = original("tv.resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lc = _convert("tv.resnet18")
    randomize_gates(lc)
    with torch.no_grad():
        for p in lc.parameters():
            p.add_(1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, lcsurgery.GatedBlock) for m in model.modules())


def test_converted_model_can_be_traced_again():
    lc = _convert("cifar.resnet20").eval()
    randomize_gates(lc)
    gm = fx.symbolic_trace(lc)
    x = example("cifar.resnet20", batch=4)
    with torch.no_grad():
        lc.execution = "masked"
        assert torch.allclose(gm(x), lc(x))


class TestOptions:
    def test_exclude_by_name_and_pattern(self):
        lc = _convert("tv.resnet18", exclude=["layer1.0", "layer4.*"])
        names = [b.name for b in lcsurgery.gated_blocks(lc)]
        assert names == ["layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"]
        found = lcsurgery.find_blocks(original("tv.resnet18"), exclude=["layer4.*"], input_size=(3, 64, 64))
        assert {r.name for r in found.rejected} == {"layer4.0", "layer4.1"}
        assert all("excluded" in r.reason for r in found.rejected)

    def test_layers_only_and_channels_only(self):
        layers_only = _convert("tv.resnet18", channels=False)
        assert all(b.c_net is None and b.l_net is not None for b in lcsurgery.gated_blocks(layers_only))
        channels_only = _convert("tv.resnet18", layers=False)
        assert all(b.l_net is None and b.c_net is not None for b in lcsurgery.gated_blocks(channels_only))
        x = example("tv.resnet18")
        with torch.no_grad():
            ref = original("tv.resnet18")(x)
            for lc in (layers_only.eval(), channels_only.eval()):
                assert (lc(x) - ref).abs().max() <= 1e-5 * ref.abs().max()

    def test_slope_gives_gradient_in_training_only(self):
        """Default straight-through ReLU-1: hard value, leaky gradient in training."""
        lc = _convert("cifar.resnet20", slope=0.2)
        blk = lcsurgery.gated_blocks(lc)[0]
        assert blk.slope == 0.2
        with torch.no_grad():
            blk.l_net.weight.zero_()
            blk.l_net.bias.fill_(-5.0)  # a closed layer gate
        lc.train()
        lc(example("cifar.resnet20", batch=2))
        assert torch.equal(blk.last.s_l.detach(), torch.zeros(2))
        blk.last.s_l.sum().backward()
        assert torch.allclose(blk.l_net.bias.grad, torch.tensor([0.4]))  # slope 0.2, two samples
        blk.force(keep=False)
        lc.eval()
        with torch.no_grad():
            lc(example("cifar.resnet20", batch=2))
        assert not blk.last.keep().any()

    def test_leaky_mode_is_leaky_in_the_forward(self):
        lc = _convert("cifar.resnet20", slope=0.2, relu1_mode="leaky")
        blk = lcsurgery.gated_blocks(lc)[0]
        blk.force(keep=False)
        lc.train()
        lc(example("cifar.resnet20", batch=2))
        assert torch.allclose(blk.last.s_l, torch.full_like(blk.last.s_l, -0.2))  # 0.2 * (-1)

    def test_unknown_relu1_mode_is_rejected(self):
        with pytest.raises(ValueError, match="relu1_mode"):
            _convert("cifar.resnet20", relu1_mode="soft")

    def test_extra_leaf_module_hides_its_block(self):
        lc = _convert("tv.resnet18", leaf_modules=["layer1.0"])
        assert [b.name for b in lcsurgery.gated_blocks(lc)][0] == "layer1.1"
        assert len(lcsurgery.gated_blocks(lc)) == 7

    def test_placement_switch(self):
        lc = _convert("cifar.resnet20")
        assert lc.placement == "parallel"
        lc.placement = "sequential"
        assert all(b.placement == "sequential" for b in lcsurgery.gated_blocks(lc))
        with pytest.raises(ValueError, match="placement must be 'parallel' or 'sequential'"):
            lc.placement = "diagonal"

    def test_force_pins_gates(self):
        lc = _convert("cifar.resnet20").eval()
        blocks = lcsurgery.gated_blocks(lc)
        blocks[0].force(keep=False)
        mask = torch.zeros(16, dtype=torch.bool)
        mask[:5] = True
        blocks[1].force(channels=mask)
        with torch.no_grad():
            lc(example("cifar.resnet20", batch=3))
        assert not blocks[0].last.keep().any()
        assert torch.equal(blocks[1].last.active(), mask.expand(3, 16))
        with pytest.raises(ValueError, match="gates 16 channels"):
            blocks[1].force(channels=torch.ones(3, dtype=torch.bool))
