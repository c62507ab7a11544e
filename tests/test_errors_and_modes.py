"""Bad input gets one clear error, nothing half-converted; train/eval behaviour survives tracing."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from zoo import example, original

import lcsurgery


class DataDependentBlock(nn.Module):
    """Python control flow on tensor values: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


class ResNetWithUntraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.weird = DataDependentBlock()

    def forward(self, x):
        x = self.stem(x)
        x = x + self.body(x)
        return self.weird(x)


class ModeBranchingBlock(nn.Module):
    """A residual block whose own forward reads ``self.training`` (as much user code does)."""

    def __init__(self, c: int = 8, p: float = 0.5) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.p = p

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.dropout(out, self.p, training=self.training)
        return x + self.bn2(self.conv2(out))


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = ModeBranchingBlock()
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


@pytest.mark.parametrize("name", ["vgg11", "densenet121"])
def test_model_without_residual_blocks(name):
    with pytest.raises(lcsurgery.NoResidualBlocksError, match=r"has no residual block to gate.*add\(branch\(x\), shortcut\(x\)\)"):
        lcsurgery.convert(getattr(torchvision.models, name)(), input_size=(3, 64, 64))


def test_untraceable_module_is_named_with_a_fix():
    model = ResNetWithUntraceable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lcsurgery.TraceError) as err:
        lcsurgery.convert(model, input_size=(3, 16, 16))
    msg = str(err.value)
    assert "'weird'" in msg and "DataDependentBlock" in msg and "leaf_modules=['weird']" in msg
    assert "symbolically traced variables cannot be used as inputs to control flow" in msg  # fx's own reason
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    lc = lcsurgery.convert(model, leaf_modules=["weird"], input_size=(3, 16, 16))
    assert [b.name for b in lcsurgery.gated_blocks(lc)] == ["add"]


def test_unknown_placement():
    with pytest.raises(ValueError, match="placement must be 'parallel' or 'sequential', got 'serial'"):
        lcsurgery.convert(original("cifar.resnet20"), placement="serial")


def test_already_converted():
    lc = lcsurgery.convert(original("cifar.resnet20"))
    with pytest.raises(lcsurgery.LCSurgeryError, match="already converted by lcsurgery"):
        lcsurgery.convert(lc)
    with pytest.raises(lcsurgery.LCSurgeryError, match="already converted by lcsurgery"):
        lcsurgery.find_blocks(nn.Sequential(lc))


def test_checkpoint_of_another_architecture():
    lc = lcsurgery.convert(original("tv.resnet18"), input_size=(3, 64, 64))
    before = {k: v.clone() for k, v in lc.state_dict().items()}
    with pytest.raises(lcsurgery.CheckpointMismatchError, match=r"another architecture.*missing \(e\.g\. layer1\.0\.conv3\.weight|unexpected"):
        lcsurgery.load_weights(lc, torchvision.models.resnet50().state_dict())
    assert all(torch.equal(before[k], v) for k, v in lc.state_dict().items())  # nothing half-loaded
    with pytest.raises(lcsurgery.CheckpointMismatchError, match=r"with another shape.*fc\.weight: checkpoint \(10, 512\) vs model \(1000, 512\)"):
        lcsurgery.load_weights(lc, torchvision.models.resnet18(num_classes=10).state_dict())


def test_not_a_converted_model():
    with pytest.raises(lcsurgery.LCSurgeryError, match="expected a model converted by lcsurgery.convert"):
        lcsurgery.gated_blocks(torchvision.models.resnet18())


def test_bad_options():
    with pytest.raises(ValueError, match="slope must be in"):
        lcsurgery.convert(original("cifar.resnet20"), slope=1.5)
    with pytest.raises(lcsurgery.LCSurgeryError, match="no residual block to gate"):
        lcsurgery.convert(original("cifar.resnet20"), layers=False, channels=False)
    with pytest.raises(lcsurgery.TraceError, match="not submodules"):
        lcsurgery.convert(original("cifar.resnet20"), leaf_modules=["nope.conv"])
    with pytest.raises(lcsurgery.LCSurgeryError, match=r"input_size=\(C, H, W\)"):
        lcsurgery.convert(original("cifar.resnet20"), input_size=(5, 32, 32))


def test_user_block_reading_its_training_flag_is_gated_and_reads_the_flag_live():
    """``F.dropout(out, training=self.training)`` in the user's own block: the traced graph reads the
    block's live ``training`` flag (not a constant baked in at trace time), so the block is gated,
    its C-Net sits after the dropout's input, and dropout behaves as in the original in both modes."""
    torch.manual_seed(0)
    model = TinyNet()
    lc = lcsurgery.convert(model, input_size=(3, 16, 16))
    (block,) = lcsurgery.gated_blocks(lc)
    assert block.name == "block" and block.info.gates == "layer+channel"
    reads_flag = [n for n in block.pieces["mid"].nodes if n.op == "get_attr" and n.target == "block.training"]
    assert len(reads_flag) == 1 and any(n.target is F.dropout for n in reads_flag[0].users)
    x = torch.randn(4, 3, 16, 16)
    model.train(), lc.train()
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    b = lc(x)
    assert torch.equal(a, b)  # same dropout masks: train behaviour kept, not baked to eval
    model.eval(), lc.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x)) and torch.allclose(model(x), lc(x), atol=1e-6)  # no dropout in eval


@pytest.mark.parametrize(
    "factory",
    [
        lambda: timm.create_model("resnet50", drop_path_rate=0.5, zero_init_last=False),
        lambda: timm.create_model("efficientnet_b0", drop_path_rate=0.5, drop_rate=0.3),
        lambda: torchvision.models.efficientnet_b0(stochastic_depth_prob=0.5),
        lambda: torchvision.models.convnext_tiny(stochastic_depth_prob=0.5),
    ],
    ids=["timm.resnet50", "timm.efficientnet_b0", "tv.efficientnet_b0", "tv.convnext_tiny"],
)
def test_stochastic_depth_still_random_in_training(factory):
    torch.manual_seed(0)
    model = factory()
    lc = lcsurgery.convert(model, input_size=(3, 64, 64))
    x = example("tv.resnet50", batch=2)
    model.train(), lc.train()
    torch.manual_seed(5)
    a = model(x)
    torch.manual_seed(5)
    b = lc(x)
    torch.manual_seed(6)
    c = lc(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(b, c)
