"""Eval-time ops the skip engine runs: convs with BatchNorm folded in, sliceable by channel.

A block's pieces are lowered to short lists of these ops. Conv/linear ops can compute a subset
of their output filters (``rows``) or read a subset of their input channels (``cols``); per-channel
ops (activations, folded norms) run unchanged on sliced tensors. Anything the lowering does not
recognise stays a ``GraphOp`` that runs the original graph code on full tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from lcsurgery.fx.ops import STOCHASTIC_DEPTH_TYPES, is_per_channel


class ConvOp:
    """Conv2d or Linear with an optional per-output-channel affine (folded BatchNorm)."""

    def __init__(self, module: nn.Module) -> None:
        self.linear = isinstance(module, nn.Linear)
        self.weight = module.weight.detach()
        self.bias = module.bias.detach() if module.bias is not None else None
        if not self.linear:
            self.stride, self.padding, self.dilation, self.groups = module.stride, module.padding, module.dilation, module.groups
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise NotImplementedError("only zero, explicit padding is lowered")
        self.depthwise = not self.linear and self.groups == self.weight.shape[0] and self.weight.shape[1] == 1 and self.groups > 1

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def fold(self, scale: Tensor, shift: Tensor) -> None:
        """Absorb ``y * scale + shift`` (per output channel) into the weights."""
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        self.weight = self.weight * scale.view(shape)
        self.bias = shift if self.bias is None else self.bias * scale + shift

    @property
    def can_trim_rows(self) -> bool:
        """Output filters can be computed selectively (dense or depthwise, not general grouped)."""
        return self.linear or self.groups == 1 or self.depthwise

    @property
    def can_trim_cols(self) -> bool:
        return self.linear or self.groups == 1

    def __call__(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, groups: int | None = None) -> Tensor:
        w = self.weight if weight is None else weight
        b = self.bias if weight is None else bias
        if self.linear:
            return F.linear(x, w, b)
        return F.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.groups if groups is None else groups)

    def rows(self, idx: Tensor) -> tuple[Tensor, Tensor | None]:
        """Weights and bias of the filters in ``idx``."""
        return self.weight.index_select(0, idx), (self.bias.index_select(0, idx) if self.bias is not None else None)

    def cols(self, idx: Tensor) -> Tensor:
        """Weights reading only the input channels in ``idx``."""
        return self.weight.index_select(1, idx)


class AffineOp:
    """A per-channel ``x * scale + shift`` (a BatchNorm that had no conv to fold into)."""

    def __init__(self, scale: Tensor, shift: Tensor, channel_dim: int) -> None:
        self.scale, self.shift, self.channel_dim = scale, shift, channel_dim

    def __call__(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        scale = self.scale if idx is None else self.scale.index_select(0, idx)
        shift = self.shift if idx is None else self.shift.index_select(0, idx)
        shape = [1] * x.dim()
        shape[self.channel_dim] = -1
        return torch.addcmul(shift.view(shape), x, scale.view(shape))


class ActOp:
    """An elementwise function; runs unchanged on channel-sliced tensors."""

    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        self.fn = fn

    def __call__(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        return self.fn(x)


class GraphOp:
    """Original graph code for what the lowering does not recognise (full tensors only)."""

    def __init__(self, piece: Callable[[nn.Module, Tensor], Tensor], root: nn.Module) -> None:
        self.piece, self.root = piece, root

    def __call__(self, x: Tensor, idx: Tensor | None = None) -> Tensor:
        if idx is not None:
            raise RuntimeError("GraphOp cannot run on channel-sliced tensors")
        return self.piece(self.root, x)


Op = ConvOp | AffineOp | ActOp | GraphOp


def bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift``."""
    var, mean = bn.running_var, bn.running_mean
    eps = getattr(bn, "eps", 1e-5)
    weight = bn.weight if getattr(bn, "weight", None) is not None else torch.ones_like(var)
    bias = bn.bias if getattr(bn, "bias", None) is not None else torch.zeros_like(mean)
    scale = weight.detach() / torch.sqrt(var + eps)
    return scale, bias.detach() - mean * scale


def _is_eval_bn(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.track_running_stats and m.running_mean is not None
    return "FrozenBatchNorm" in type(m).__name__ and hasattr(m, "running_mean")


IDENTITY_TYPES: tuple[type, ...] = (nn.Identity, nn.modules.dropout._DropoutNd, *STOCHASTIC_DEPTH_TYPES)  # identity in eval


def lower_node(node: fx.Node, root: nn.Module, channel_dim: int) -> list[Op] | None:
    """Eval-time ops equivalent to one single-input node, or None if not recognised."""
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if isinstance(m, IDENTITY_TYPES):
            return []
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            try:
                return [ConvOp(m)]
            except NotImplementedError:
                return None
        if _is_eval_bn(m):
            ops: list[Op] = [AffineOp(*bn_affine(m), channel_dim)]
            act = getattr(m, "act", None)  # timm BatchNormAct2d: BN, then drop, then act
            if isinstance(act, nn.Module) and not isinstance(act, IDENTITY_TYPES):
                ops.append(ActOp(act))
            return ops
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    if len(inputs) != 1 or not is_per_channel(node, root, inputs[0]):
        return None
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return [ActOp(torch.relu if type(m) is nn.ReLU else m)]
    src = inputs[0]
    if node.op == "call_function" and node.target in _RELUS and node.args == (src,) and not node.kwargs.get("inplace"):
        return [ActOp(torch.relu)]  # the ATen op itself: F.relu's Python wrapper costs ~2 us a call at batch 1
    if node.op == "call_function":
        return [ActOp(partial(_apply_function, node.target, node.args, node.kwargs, src))]
    if node.op == "call_method":
        return [ActOp(partial(_apply_method, node.target, node.args[1:], node.kwargs))]
    return None


_RELUS = (F.relu, torch.relu)


def _apply_function(fn: Callable, args: tuple, kwargs: dict, src: fx.Node, x: Tensor) -> Tensor:
    return fn(*[x if a is src else a for a in args], **kwargs)


def _apply_method(name: str, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return getattr(x, name)(*args, **kwargs)


def lower_chain(nodes: list[fx.Node], root: nn.Module, channel_dim: int) -> list[Op] | None:
    """Lower a chain of single-input nodes, folding each BatchNorm into the conv before it."""
    ops: list[Op] = []
    prev: fx.Node | None = None
    for node in nodes:
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if prev is not None and inputs != [prev]:
            return None
        lowered = lower_node(node, root, channel_dim)
        if lowered is None:
            return None
        for op in lowered:
            if isinstance(op, AffineOp) and ops and isinstance(ops[-1], ConvOp):
                ops[-1].fold(op.scale, op.shift)
            else:
                ops.append(op)
        prev = node
    return ops
