"""Kernel floor: the time a forward pass spends in its multiply-accumulate kernels alone.

``record_kernels`` notes every conv, linear and matrix-product call one forward pass makes
(shapes and hyper-parameters); ``replay`` builds fresh tensors of those shapes once and returns
a function that runs the same calls and nothing else. Timing the replay gives what an engine
with no overhead at all around its kernels would take. Across gate patterns it gives the
*kernel-bound efficiency*: the best skipping efficiency any engine built on this backend's
kernels could reach. A target above it needs other kernels, not a leaner engine.

The recorded calls are also a check on the accounting: their MACs are the MACs the engine
really executed, which ``lcsurgery.count_macs`` must match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

_MATMULS = {F.linear: "linear", torch.addmm: "addmm", torch.mm: "mm", torch.matmul: "matmul"}


@dataclass(frozen=True)
class KernelCall:
    """One MAC-bearing call as the forward made it: operand shapes and the conv's hyper-parameters."""

    op: str  # "conv2d", "linear", "addmm", "mm" or "matmul"
    input: tuple[int, ...]
    weight: tuple[int, ...]  # conv/linear weight, or the second matrix of a product
    output: tuple[int, ...]
    bias: tuple[int, ...] | None = None
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the call (what fvcore counts for it): every output element sums
        over a conv filter's (C_in / groups) x kh x kw inputs, or over a product's inner dimension."""
        inner = math.prod(self.weight[1:]) if self.op == "conv2d" else self.input[-1]
        return math.prod(self.output) * inner


def _pair(v: int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _shape(t: object) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, Tensor) else None


class _Recorder(TorchFunctionMode):
    """Notes every conv and matrix call made under it (nested calls inside them are not seen)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[KernelCall] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's protocol)
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.conv2d:
            names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
            a = dict(zip(names, args)) | kwargs
            if isinstance(a.get("padding", 0), str):
                raise NotImplementedError("string padding is not replayed")
            self.calls.append(KernelCall(
                "conv2d", _shape(a["input"]), _shape(a["weight"]), _shape(out), _shape(a.get("bias")),
                _pair(a.get("stride", 1)), _pair(a.get("padding", 0)), _pair(a.get("dilation", 1)), a.get("groups", 1),
            ))  # fmt: skip
        elif func in _MATMULS:
            op = _MATMULS[func]
            if op == "addmm":
                bias, x, w = args[:3]
            else:
                x, w = args[:2]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.calls.append(KernelCall(op, _shape(x), _shape(w), _shape(out), _shape(bias)))
        return out


def record_kernels(fn: Callable[[], object]) -> list[KernelCall]:
    """The conv / linear / matrix-product calls ``fn()`` makes, in order."""
    with torch.no_grad(), _Recorder() as rec:
        fn()
    return rec.calls


def replay(calls: list[KernelCall], seed: int = 0, device: torch.device | str = "cpu") -> Callable[[], None]:
    """A function that runs ``calls`` alone, on tensors of their shapes made once here (on ``device``)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...] | None) -> Tensor | None:
        return None if shape is None else torch.randn(shape, generator=gen).to(device)

    steps: list[Callable[[], Tensor]] = []
    for c in calls:
        x, w, b = rand(c.input), rand(c.weight), rand(c.bias)
        if c.op == "conv2d":
            steps.append(lambda x=x, w=w, b=b, c=c: F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups))
        elif c.op == "linear":
            steps.append(lambda x=x, w=w, b=b: F.linear(x, w, b))
        elif c.op == "addmm":
            steps.append(lambda x=x, w=w, b=b: torch.addmm(b, x, w))
        else:
            steps.append(lambda x=x, w=w: torch.matmul(x, w))

    def run() -> None:
        with torch.no_grad():
            for step in steps:
                step()

    return run
