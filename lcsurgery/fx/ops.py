"""What each traced op does to channels: the facts the block finder reasons with.

- *conv-like*: a ``Conv2d`` or ``Linear`` leaf; its output channels are filters that can be
  trimmed, its input channels can be read selectively.
- *per-channel*: output channel k depends only on input channel k (BatchNorm, elementwise
  activations, dropout, depthwise convs, per-channel scales). Between the first conv and the
  C-Net gate only such ops may stand, so a zero gate frees the whole chain for that channel.
- *zero-preserving*: maps a zero channel to a zero channel (ReLU, SiLU, a squeeze-excitation
  multiply...). Between the gate and the next conv only such ops may stand, so the next conv
  may skip reading the gated-off channels.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

_ZERO_PRESERVING_ACT_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Mish, nn.Tanh, nn.LeakyReLU, nn.ELU,
    nn.CELU, nn.SELU, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.Identity,
    nn.modules.dropout._DropoutNd,
)  # fmt: skip
_OTHER_ELEMENTWISE_MODULES: tuple[type, ...] = (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid)

_ZERO_PRESERVING_FUNCTIONS: set[Callable] = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardswish, F.mish, F.leaky_relu, F.elu, F.celu, F.selu,
    F.hardtanh, F.dropout, torch.relu, torch.tanh, F.tanh, torch.nn.functional.dropout2d,
}  # fmt: skip
_OTHER_ELEMENTWISE_FUNCTIONS: set[Callable] = {torch.sigmoid, F.sigmoid, F.hardsigmoid, F.softplus}
_ZERO_PRESERVING_METHODS = {"relu", "relu_", "tanh", "tanh_", "contiguous"}
_OTHER_ELEMENTWISE_METHODS = {"sigmoid", "sigmoid_"}
_MUL = {operator.mul, torch.mul, "mul", "mul_"}


def _stochastic_depth_types() -> tuple[type, ...]:
    """Per-sample drop modules: identity in eval, zero-preserving in training."""
    types: list[type] = []
    try:
        from torchvision.ops import StochasticDepth

        types.append(StochasticDepth)
    except ImportError:  # torchvision is optional
        pass
    try:
        import timm.layers as tl

        types += [tl.DropPath, tl.DropBlock2d]
    except ImportError:  # timm is optional
        pass
    return tuple(types)


STOCHASTIC_DEPTH_TYPES = _stochastic_depth_types()


def _is_timm_activation(m: nn.Module) -> bool:
    """timm's activation modules (Swish, HardSwish, GELU...) are elementwise and zero-preserving,
    except the sigmoid family, which maps 0 to 0.5."""
    mod = type(m).__module__
    if not (mod.startswith("timm.layers.activations") or mod.startswith("timm.layers.create_act")):
        return False
    return "sigmoid" not in type(m).__name__.lower()


def _is_batchnorm(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return True
    return "FrozenBatchNorm" in type(m).__name__  # torchvision / timm frozen BN: per-channel affine


def is_conv_like(node: fx.Node, root: nn.Module) -> bool:
    """A ``Conv2d`` or ``Linear`` leaf whose filters can be trimmed."""
    if node.op != "call_module":
        return False
    m = root.get_submodule(node.target)
    return isinstance(m, (nn.Conv2d, nn.Linear))


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == m.in_channels == m.out_channels and m.groups > 1


def _is_zero_preserving_module(m: nn.Module) -> bool:
    if isinstance(m, _ZERO_PRESERVING_ACT_MODULES + STOCHASTIC_DEPTH_TYPES):
        if isinstance(m, nn.Hardtanh) and not (m.min_val <= 0 <= m.max_val):
            return False
        return True
    return _is_timm_activation(m)


def _single_data_input(node: fx.Node) -> fx.Node | None:
    """The one tensor input of a unary op (other arguments must be constants)."""
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return inputs[0] if len(inputs) == 1 else None


def is_per_channel(node: fx.Node, root: nn.Module, src: fx.Node) -> bool:
    """True if output channel k of ``node`` depends on channel k of ``src`` alone."""
    if _single_data_input(node) is not src:
        return False
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        return (
            _is_batchnorm(m)
            or _is_zero_preserving_module(m)
            or isinstance(m, _OTHER_ELEMENTWISE_MODULES)
            or is_depthwise(m)
            or (isinstance(m, nn.PReLU) and m.num_parameters == 1)
        )
    if node.op == "call_function":
        if node.target in _ZERO_PRESERVING_FUNCTIONS or node.target in _OTHER_ELEMENTWISE_FUNCTIONS:
            return True
        return node.target in _MUL and _is_scalar_other(node, src)
    if node.op == "call_method":
        if node.target in _ZERO_PRESERVING_METHODS or node.target in _OTHER_ELEMENTWISE_METHODS:
            return True
        return node.target in _MUL and _is_scalar_other(node, src)
    return False


def _is_scalar_other(node: fx.Node, src: fx.Node) -> bool:
    others = [a for a in node.args if a is not src]
    return len(others) == 1 and isinstance(others[0], (int, float))


def is_zero_preserving(node: fx.Node, root: nn.Module, src: fx.Node, channel_dim: int) -> bool:
    """True if a zero in channel k of ``src`` stays zero in ``node`` (for every other input)."""
    if node.op == "call_module":
        return _single_data_input(node) is src and _is_zero_preserving_module(root.get_submodule(node.target))
    if node.op == "call_function" and node.target in _ZERO_PRESERVING_FUNCTIONS:
        return _single_data_input(node) is src
    if node.op == "call_method" and node.target in _ZERO_PRESERVING_METHODS:
        return node.args[0] is src
    if node.target in _MUL and node.op in ("call_function", "call_method"):
        return is_channel_scale(node, src, channel_dim)
    return False


def is_channel_scale(node: fx.Node, src: fx.Node, channel_dim: int) -> bool:
    """``src * s`` where ``s`` holds one value per (sample, channel), e.g. squeeze-excitation."""
    if len(node.args) != 2 or src not in node.args:
        return False
    other = node.args[1] if node.args[0] is src else node.args[0]
    if isinstance(other, (int, float)):
        return True
    if not isinstance(other, fx.Node):
        return False
    s_shape, x_shape = tensor_shape(other), tensor_shape(src)
    if s_shape is None or x_shape is None or len(s_shape) > len(x_shape):
        return False
    s_shape = (1,) * (len(x_shape) - len(s_shape)) + tuple(s_shape)
    cdim = channel_dim % len(x_shape)
    return all(s == 1 for d, s in enumerate(s_shape) if d not in (0, cdim))


def tensor_shape(node: fx.Node) -> tuple[int, ...] | None:
    """The shape ShapeProp recorded for ``node`` (None for non-tensors)."""
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}


def is_add(node: fx.Node) -> bool:
    """An addition of two tensors with unit weight (``a + b``, ``torch.add(a, b)``, ``a.add(b)``)."""
    is_function = node.op == "call_function" and node.target in _ADD_FUNCTIONS
    is_method = node.op == "call_method" and node.target in _ADD_METHODS
    if not (is_function or is_method) or node.kwargs.get("alpha", 1) != 1 or len(node.args) != 2:
        return False
    return all(isinstance(a, fx.Node) for a in node.args)


def conv_macs(node: fx.Node, root: nn.Module) -> int:
    """Multiply-accumulates of a conv-like leaf from its recorded output shape (0 for others)."""
    if not is_conv_like(node, root):
        return 0
    m = root.get_submodule(node.target)
    out = tensor_shape(node)
    if out is None:
        return 0
    if isinstance(m, nn.Linear):
        n = 1
        for d in out[:-1]:
            n *= d
        return n * m.in_features * m.out_features
    k = m.kernel_size[0] * m.kernel_size[1]
    return out[0] * out[1] * out[2] * out[3] * (m.in_channels // m.groups) * k
