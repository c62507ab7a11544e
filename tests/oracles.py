"""Physically sliced networks: the ground truth for per-image MAC accounting.

For one image and fixed gate decisions, each gated block is rebuilt with smaller layers:
a skipped block keeps only its shortcut, a kept block's convs are cut to the active channels
(the first conv's filters only in sequential placement; in parallel it runs in full and its
output is indexed). Every block still computes its gates (pooling and both FCs) and uses their
values. Built from torchvision's own block classes, independently of lcsurgery's graph
machinery, so fvcore's count of it checks the library's accounting.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
import torchvision
from fvcore.nn import FlopCountAnalysis
from torch import Tensor, nn

from lcsurgery.models import cifar_resnet


def conv_fc_macs(model: nn.Module, x: Tensor) -> int:
    """fvcore's count with norms, pooling and upsampling zeroed: convolutions and FC layers only."""
    analysis = FlopCountAnalysis(model, (x,))
    for op in ("aten::batch_norm", "aten::adaptive_avg_pool2d", "aten::layer_norm", "aten::group_norm", "aten::instance_norm", "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::grid_sampler"):
        analysis.set_op_handle(op, lambda *_: 0)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return int(analysis.total())


def _conv(conv: nn.Conv2d, out_idx: Tensor | None = None, in_idx: Tensor | None = None, depthwise: bool = False) -> nn.Conv2d:
    w = conv.weight.detach()
    if out_idx is not None:
        w = w[out_idx]
    if in_idx is not None and not depthwise:
        w = w[:, in_idx]
    groups = len(out_idx) if depthwise else conv.groups
    new = nn.Conv2d(w.shape[1] * groups, w.shape[0], conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups, bias=conv.bias is not None)
    new.weight.data.copy_(w)
    if conv.bias is not None:
        new.bias.data.copy_(conv.bias.detach() if out_idx is None else conv.bias.detach()[out_idx])
    return new


def _bn(bn: nn.BatchNorm2d, idx: Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(idx), eps=bn.eps).eval()
    for name in ("weight", "bias", "running_mean", "running_var"):
        getattr(new, name).data.copy_(getattr(bn, name).detach()[idx])
    return new


class _Gates(nn.Module):
    """The block's gates, computed for real: one pooling shared by L-Net and C-Net."""

    def __init__(self, gated) -> None:
        super().__init__()
        self.l_net, self.c_net = copy.deepcopy(gated.l_net), copy.deepcopy(gated.c_net)
        self.mean, self.scale = gated.input_mean.clone(), gated.input_scale.clone()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        p = (F.adaptive_avg_pool2d(x, 1).flatten(1) - self.mean) * self.scale
        return self.l_net(p).clamp(0, 1), self.c_net(p).clamp(0, 1)


class SlicedBlock(nn.Module):
    """conv-first (rows) -> per-channel ops (sliced) -> gate -> conv-next (cols) -> rest, plus shortcut."""

    def __init__(self, gated, keep: bool, active: Tensor, sequential: bool, head: list, tail: list, shortcut, post_act) -> None:
        super().__init__()
        self.gates = _Gates(gated)
        self.keep = keep
        self.idx = active.nonzero().squeeze(1)
        self.shortcut = shortcut
        self.post_act = post_act
        if not keep:
            return
        first, *mid = head
        self.pick = not sequential  # parallel: the first conv ran in full, its output is indexed
        self.first = first if self.pick else _conv(first, out_idx=self.idx)
        self.mid = nn.ModuleList(
            _bn(m, self.idx) if isinstance(m, nn.BatchNorm2d) else _conv(m, out_idx=self.idx, depthwise=True) if isinstance(m, nn.Conv2d) else m for m in mid
        )
        nxt, *rest = tail
        assert nxt.bias is None
        self.next_channels = nxt.out_channels
        self.next = _conv(nxt, in_idx=self.idx) if len(self.idx) else None
        self.rest = nn.ModuleList(rest)

    def forward(self, x: Tensor) -> Tensor:
        s_l, s_c = self.gates(x)
        sc = self.shortcut(x)
        if not self.keep:  # the gates decided; their values must still be computed (and so counted)
            return self.post_act(sc + 0 * (s_l.sum() + s_c.sum()))
        if self.next is None:  # no active channel: the next conv reads nothing and outputs zeros
            h = torch.zeros(x.shape[0], self.next_channels, *sc.shape[2:])
        else:
            h = self.first(x)
            if self.pick:
                h = h[:, self.idx]
            for m in self.mid:
                h = m(h)
            h = h * s_c[:, self.idx, None, None]
            h = self.next(h)
        for m in self.rest:
            h = m(h)
        return self.post_act(sc + h * s_l[:, :, None, None])


def _decisions(gated) -> tuple[bool, Tensor]:
    last = gated.last
    return bool(last.keep()[0]), last.active()[0]


def sliced_torchvision_resnet(model: torchvision.models.ResNet, lc, sequential: bool) -> nn.Module:
    """ResNet-18/50 with each block cut to one image's decisions (``lc`` has just run on that image)."""
    net = copy.deepcopy(model)
    for gated in lc.lc_blocks():
        blk = net.get_submodule(gated.name)
        keep, active = _decisions(gated)
        bottleneck = isinstance(blk, torchvision.models.resnet.Bottleneck)
        head = [blk.conv1, blk.bn1, nn.ReLU()]
        tail = [blk.conv2, blk.bn2] + ([nn.ReLU(), blk.conv3, blk.bn3] if bottleneck else [])
        shortcut = blk.downsample if blk.downsample is not None else nn.Identity()
        _replace(net, gated.name, SlicedBlock(gated, keep, active, sequential, head, tail, shortcut, nn.ReLU()))
    return net


def sliced_mobilenet_v2(model: torchvision.models.MobileNetV2, lc, sequential: bool) -> nn.Module:
    net = copy.deepcopy(model)
    for gated in lc.lc_blocks():
        blk = net.get_submodule(gated.name)
        keep, active = _decisions(gated)
        expand, dw, project, bn = blk.conv
        head = [expand[0], expand[1], expand[2], dw[0], dw[1], dw[2]]
        _replace(net, gated.name, SlicedBlock(gated, keep, active, sequential, head, [project, bn], nn.Identity(), nn.Identity()))
    return net


class _OptionA(nn.Module):
    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return cifar_resnet.option_a_shortcut(x, self.pad) if self.pad else x


def sliced_cifar_resnet(model: cifar_resnet.CifarResNet, lc, sequential: bool) -> nn.Module:
    net = copy.deepcopy(model)
    for gated in lc.lc_blocks():
        blk = net.get_submodule(gated.name)
        keep, active = _decisions(gated)
        head = [blk.conv1, blk.bn1, nn.ReLU()]
        _replace(net, gated.name, SlicedBlock(gated, keep, active, sequential, head, [blk.conv2, blk.bn2], _OptionA(blk.shortcut_pad), nn.ReLU()))
    return net


def _replace(net: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)


SLICERS = {
    "tv.resnet18": sliced_torchvision_resnet,
    "tv.resnet50": sliced_torchvision_resnet,
    "tv.mobilenet_v2": sliced_mobilenet_v2,
    "cifar.resnet20": sliced_cifar_resnet,
}
