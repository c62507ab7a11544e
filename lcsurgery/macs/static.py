"""Static per-piece costs of a converted model, counted by fvcore once per input size.

fvcore counts one multiply-accumulate as one "flop"; we call them MACs everywhere. The paper's
"GFLOPs" are these MACs for convolutions and fully connected layers.

Two conventions:
- ``"conv_fc"`` (default, the paper's): convolutions and matrix products only. Norms, pooling
  and elementwise ops cost 0, the gate's global pooling included (BatchNorm folds into convs at
  inference). Torchvision resnet50 at 224: 4,089,184,256 MACs.
- ``"fvcore"``: fvcore's default set, which adds norms, pooling and upsampling
  (resnet50 at 224: 4,111,512,576); the gate's pooling is then counted too.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.fx.tracer import training_mode
from lcsurgery.surgery.block import GatedBlock
from lcsurgery.surgery.model import LCModel

COUNTINGS = ("conv_fc", "fvcore")
_ZEROED_FOR_CONV_FC = (
    "aten::batch_norm", "aten::group_norm", "aten::layer_norm", "aten::instance_norm",
    "aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::adaptive_avg_pool2d", "aten::grid_sampler",
)  # fmt: skip


@dataclass(frozen=True)
class BlockCost:
    """MACs per image of one gated block's parts (at one input size, one convention).

    ``first``, ``mid`` and ``next`` scale with the number of active gated channels: ``first``
    in its output filters (sequential placement only), ``mid`` (per-channel ops such as a
    depthwise conv) and ``next`` in their input channels. The rest is fixed.
    """

    name: str
    channels: int  # gated channels C (0: layer gate only)
    gate: int
    shortcut: int
    pre: int
    first: int
    mid: int
    between: int
    next: int
    post: int
    branch: int  # the whole branch (sum of the parts above, or the outlined branch of a layer-only block)

    @property
    def dense(self) -> int:
        """The block in the original model: branch plus shortcut, no gate."""
        return self.branch + self.shortcut

    def fixed(self, placement: str) -> int:
        """MACs a kept block pays whatever its channel gates say."""
        if not self.channels:
            return self.branch
        return self.pre + self.between + self.post + (self.first if placement == "parallel" else 0)

    def per_channel(self, placement: str) -> int:
        """MACs each active gated channel adds to a kept block."""
        if not self.channels:
            return 0
        scaled = self.mid + self.next + (self.first if placement == "sequential" else 0)
        if scaled % self.channels:
            raise LCSurgeryError(f"internal error: MACs of {self.name} ({scaled}) are not a multiple of its {self.channels} channels")
        return scaled // self.channels


@dataclass(frozen=True)
class StaticCosts:
    """Per-image MACs of a converted model at one input size."""

    input_size: tuple[int, int, int]
    counting: str
    base: int  # everything outside the gated blocks (stem, transitions, head)
    blocks: list[BlockCost]

    @property
    def dense(self) -> int:
        """MACs of the original dense model (no gates)."""
        return self.base + sum(b.dense for b in self.blocks)

    @property
    def gates(self) -> int:
        return sum(b.gate for b in self.blocks)

    @property
    def open(self) -> int:
        """MACs of the converted model with every gate open (dense plus gates)."""
        return self.dense + self.gates


class CallModule(nn.Module):
    """Wrap a callable so fvcore (which needs a module) can trace it; ``owner`` holds its parameters."""

    def __init__(self, fn, owner: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.owner = owner

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def fvcore_macs(module: nn.Module, inputs: tuple, counting: str = "conv_fc") -> int:
    """fvcore's count for ``module(*inputs)`` under a convention, with fvcore's tracer noise silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # fvcore's import scripts a function with torch.jit
        from fvcore.nn import FlopCountAnalysis

    if counting not in COUNTINGS:
        raise ValueError(f"counting must be one of {COUNTINGS}, got {counting!r}")
    analysis = FlopCountAnalysis(module, inputs)
    if counting == "conv_fc":
        for op in _ZEROED_FOR_CONV_FC:
            analysis.set_op_handle(op, lambda *_: 0)  # a handle returning 0; None would keep the default
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit deprecation and tracer warnings, in this call only
        return int(analysis.total())


@contextlib.contextmanager
def probing(lc: LCModel) -> Iterator[None]:
    """Eval mode, masked execution, no grad; gate records of the latest real forward restored after."""
    saved = [(b, b.last, b.execution) for b in lc.lc_blocks()]
    try:
        with training_mode(lc, False), torch.no_grad():
            for b in lc.lc_blocks():
                b.execution = "masked"
            yield
    finally:
        for b, last, execution in saved:
            b.last, b.execution = last, execution


def _block_inputs(lc: LCModel, x: Tensor) -> dict[str, Tensor]:
    seen: dict[str, Tensor] = {}

    def record(block: nn.Module, args: tuple) -> None:
        seen.setdefault(block.name, args[0])

    handles = [b.register_forward_pre_hook(record) for b in lc.lc_blocks()]
    try:
        lc(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _block_cost(block: GatedBlock, x: Tensor, counting: str) -> BlockCost:
    root, p = block.root, block.pieces

    def cost(name: str, inp: Tensor) -> tuple[int, Tensor]:
        piece = p.get(name)
        if piece is None:
            return 0, inp
        out = piece(root, inp)
        return fvcore_macs(CallModule(lambda t: piece(root, t), root), (inp,), counting), out

    def gate_fn(t: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(t, 1).flatten(1)
        return torch.cat([lin(pooled) for lin in (block.l_net, block.c_net) if lin is not None], 1)

    gate = fvcore_macs(CallModule(gate_fn, block), (x,), counting)
    shortcut, _ = cost("shortcut", x)
    if not block.gated_channels:
        branch, _ = cost("branch", x)
        return BlockCost(block.name, 0, gate, shortcut, 0, 0, 0, 0, 0, 0, branch)
    pre, h = cost("pre", x)
    first, h = cost("first", h)
    mid, h = cost("mid", h)
    between, h = cost("between", h)
    nxt, h = cost("next", h)
    post, _ = cost("post", h)
    branch = pre + first + mid + between + nxt + post
    return BlockCost(block.name, block.gated_channels, gate, shortcut, pre, first, mid, between, nxt, post, branch)


def static_costs(model: nn.Module, input_size: tuple[int, int, int], counting: str = "conv_fc") -> StaticCosts:
    """Per-image static costs of a converted model at ``input_size`` = (C, H, W); cached on the model."""
    from lcsurgery.surgery.model import unwrap

    lc = unwrap(model)
    key = (tuple(input_size), counting)
    cache = lc.__dict__.setdefault("lc_static_costs", {})
    if key not in cache:
        param = next(lc.parameters())
        x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)  # counts do not depend on values
        with probing(lc):
            inputs = _block_inputs(lc, x)
            blocks = [_block_cost(b, inputs[b.name], counting) for b in lc.lc_blocks()]
            total = fvcore_macs(lc, (x,), counting)
        base = total - sum(b.dense + b.gate for b in blocks)
        cache[key] = StaticCosts(tuple(input_size), counting, base, blocks)
    return cache[key]
