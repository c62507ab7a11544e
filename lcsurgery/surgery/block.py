"""``GatedBlock``: one residual block with its L-Net and C-Net, as the converted graph calls it.

The block owns only its two gate layers (``l_net``, ``c_net``); the residual branch and the
shortcut are pieces of the original graph that run against the converted model, so parameter
names and sharing stay exactly as in the user's model.

Masked execution (training, export, debugging) computes everything and multiplies by the gates:
``out = shortcut(x) + S_L * tail(S_C * head(x))``. In eval mode the block skips work for real
(see ``lcsurgery.engine``) unless the model is switched to masked execution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcsurgery.engine.skip import BlockPlan
from lcsurgery.engine.state import GateState
from lcsurgery.fx.outline import Piece
from lcsurgery.layers.relu1 import relu1

PLACEMENTS = ("parallel", "sequential")
STATIC = (False, True, "layers", "channels")  # no gate, every gate, the L-Nets or the C-Nets ignore the input


def static_kinds(static: bool | str) -> tuple[bool, bool]:
    """Which gates of a block ignore the input, (layer gate, channel gates), for a ``static`` option."""
    if static not in STATIC or isinstance(static, int) and not isinstance(static, bool):
        raise ValueError(f"static must be one of {STATIC}, got {static!r}")
    return static in (True, "layers"), static in (True, "channels")


@dataclass(frozen=True)
class BlockInfo:
    """What the surgery found for one residual block (a row of ``find_blocks``)."""

    name: str
    in_channels: int
    gated_channels: int
    first_conv: str | None
    next_conv: str | None
    gates: str  # "layer+channel", "layer" or "channel"
    note: str = ""


class GatedBlock(nn.Module):
    """A residual block with a shared-pooling L-Net (``l_net``) and C-Net (``c_net``)."""

    def __init__(
        self,
        info: BlockInfo,
        pieces: dict[str, Piece | None],
        channel_dim: int,
        slope: float,
        placement: str,
        relu1_mode: str = "straight_through",
        noise: float = 0.0,
        static: bool | str = False,
    ) -> None:
        super().__init__()
        self.noise = noise  # training only: logistic noise on the gate logits, so gates near 0 flip
        # at random; the task loss then pushes gates to decide, and the hard cost moves smoothly
        self.info = info
        self.name = info.name
        self.channel_dim = channel_dim
        self.slope = slope
        self.relu1_mode = relu1_mode
        self.placement = placement
        self.execution = "skip"
        self.l_net = nn.Linear(info.in_channels, 1) if "layer" in info.gates else None
        self.c_net = nn.Linear(info.in_channels, info.gated_channels) if info.gated_channels else None
        # With stats_momentum > 0 (--gate-input-momentum) the gates read the pooled input
        # standardised by running statistics of the training batches, so their weights learn how
        # one image differs from the others and the bias alone sets the typical gate (the skip
        # engine folds the statistics into the gate weights). Zero and one, the state until a
        # batch is tracked, leave the input as it is: the default.
        self.register_buffer("input_mean", torch.zeros(info.in_channels))
        self.register_buffer("input_scale", torch.ones(info.in_channels))
        self.register_buffer("input_batches", torch.zeros((), dtype=torch.long))
        self.stats_momentum = 0.0  # training only, set by the loop; 0 keeps the statistics fixed
        self.weights_from_targets = False  # training only, set by the loop (see gate_logits)
        # gates that ignore the input (bias only): a learned static mask, the baseline; True makes
        # every gate static, "layers" or "channels" one kind while the other reads the image
        self.static = static
        self.static_layer, self.static_channels = static_kinds(static)
        self.reset_gates()
        for lin in self.static_nets():
            lin.weight.requires_grad_(False)
        self.pieces = pieces
        self.root: nn.Module | None = None  # the converted model; set by LCModel, not registered
        self.last: GateState | None = None
        self.engine = None  # eval-time skipping plan, built on first use by lcsurgery.engine

    def reset_gates(self) -> None:
        """Open every gate for every input: zero weights, unit bias, so S_L = S_C = 1 exactly."""
        for lin in (self.l_net, self.c_net):
            if lin is not None:
                nn.init.zeros_(lin.weight)
                nn.init.ones_(lin.bias)

    def force(self, keep: bool | None = None, channels: Tensor | None = None) -> None:
        """Pin gates for every input: ``keep`` opens/closes the block, ``channels`` (bool [C]) picks channels."""
        self.engine = None
        with torch.no_grad():
            if keep is not None:
                if self.l_net is None:
                    raise ValueError(f"block {self.name} has no layer gate")
                self.l_net.weight.zero_()
                self.l_net.bias.fill_(1.0 if keep else -1.0)
            if channels is not None:
                if self.c_net is None:
                    raise ValueError(f"block {self.name} has no channel gate")
                mask = torch.as_tensor(channels, dtype=torch.bool, device=self.c_net.bias.device)
                if mask.shape != self.c_net.bias.shape:
                    raise ValueError(f"block {self.name} gates {self.c_net.out_features} channels, got a mask of {tuple(mask.shape)}")
                self.c_net.weight.zero_()
                self.c_net.bias.copy_(mask.float() * 2 - 1)

    def static_nets(self) -> list[nn.Linear]:
        """The gate layers whose weights are unused (static): their bias alone decides."""
        return [lin for lin, fixed in ((self.l_net, self.static_layer), (self.c_net, self.static_channels)) if lin is not None and fixed]

    @property
    def gated_channels(self) -> int:
        return self.info.gated_channels

    @torch.no_grad()
    def track_input(self, pooled: Tensor) -> None:
        """Move the gate input's running mean and scale towards this batch's (the first batch sets them)."""
        mean = pooled.mean(0)
        scale = pooled.var(0, unbiased=False).add(1e-5).rsqrt() if pooled.shape[0] > 1 else self.input_scale
        # a tensor, not a Python branch: reading input_batches would wait on the GPU every training step
        m = torch.where(self.input_batches == 0, 1.0, self.stats_momentum).to(self.input_mean.dtype)
        self.input_mean.lerp_(mean, m)
        self.input_scale.lerp_(scale, m)
        self.input_batches += 1

    def gate_logits(self, pooled: Tensor, *, weights: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Both gate logits from the shared global-average-pool of the block input.

        ``weights=False`` sends no gradient to the gate weights (only to the biases): with
        ``weights_from_targets`` set, the task loss and the MAC penalty move only the biases, and
        the weights learn from per-image targets alone (``lcsurgery.train.conditional``).
        """
        standard = (pooled - self.input_mean) * self.input_scale
        out = []
        for lin, fixed in ((self.l_net, self.static_layer), (self.c_net, self.static_channels)):
            if lin is None:
                out.append(None)
            elif fixed:  # the bias alone decides, whatever the image
                out.append(lin.bias.expand(pooled.shape[0], -1))
            else:
                out.append(F.linear(standard, lin.weight if weights else lin.weight.detach(), lin.bias))
        z_l, z_c = out
        return (None if z_l is None else z_l.squeeze(1)), z_c

    def forward(self, x: Tensor) -> Tensor:
        # Real skipping needs eval mode without autograd (gradients must reach every parameter,
        # e.g. when training with BatchNorm frozen by eval()) and no tracer recording the graph.
        if self.training or self.execution != "skip" or torch.is_grad_enabled() or _is_exporting():
            return self.masked_forward(x)
        plan = self.engine
        if plan is None or not plan.valid():  # first eval call, or gate weights changed in place
            plan = self.engine = BlockPlan(self)
        return plan(x)

    def masked_forward(self, x: Tensor) -> Tensor:
        """Compute every op and scale by the gates (differentiable; the reference semantics)."""
        # Detached: the gates learn from the backbone's features but send no gradient back into
        # them, so the task loss cannot form a feedback loop between a block's input and its gates
        # (docs/training.md).
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1).detach()  # fvcore counts this op (gate costs under counting="fvcore")
        if self.training and self.stats_momentum > 0:
            self.track_input(pooled)
        z_l, z_c = self.gate_logits(pooled, weights=not self.weights_from_targets)
        if self.training and self.noise > 0:
            z_l, z_c = (None if z is None else z + self.noise * _logistic_like(z) for z in (z_l, z_c))
        slope = self.slope if self.training else 0.0
        s_l = relu1(z_l, slope, self.relu1_mode) if z_l is not None else None
        s_c = relu1(z_c, slope, self.relu1_mode) if z_c is not None else None
        self.last = GateState(
            z_l.detach() if z_l is not None else None,
            z_c.detach() if z_c is not None else None,
            s_l,
            s_c,
            pooled if self.training else None,
        )
        root, p = self.root, self.pieces
        if s_c is None:
            h = p["branch"](root, x)
        else:
            h = _run(p["pre"], root, x)
            h = _run(p["mid"], root, p["first"](root, h))
            if self.training:
                dims = (2, 3) if self.channel_dim == 1 else (1, 2)
                self.last.channel_mass = h.detach().abs().mean(dims)
            h = h * self.channel_view(s_c)
            h = _run(p["post"], root, p["next"](root, _run(p["between"], root, h)))
        shortcut = _run(p["shortcut"], root, x)
        if self.training:
            self.last.residual_ratio = _mean_abs(h) / _mean_abs(shortcut).clamp_min(1e-12)
        if s_l is None:
            return shortcut + h
        return shortcut + h * s_l[:, None, None, None]

    def channel_view(self, s_c: Tensor) -> Tensor:
        """[B, C] channel gates shaped to broadcast over the 4-D gated tensor (NCHW, or NHWC for Linear)."""
        return s_c[:, :, None, None] if self.channel_dim == 1 else s_c[:, None, None, :]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, gates={self.info.gates}, in={self.info.in_channels}, gated_channels={self.gated_channels}, placement={self.placement}"


def _mean_abs(t: Tensor) -> Tensor:
    """[B] mean absolute value of each sample (detached)."""
    return t.detach().abs().flatten(1).mean(1)


def _logistic_like(z: Tensor) -> Tensor:
    """Standard logistic noise shaped like ``z`` (the difference of two Gumbel draws)."""
    u = torch.rand_like(z).clamp_(1e-6, 1 - 1e-6)
    return torch.log(u) - torch.log1p(-u)


def _run(piece: Piece | None, root: nn.Module, x: Tensor) -> Tensor:
    return x if piece is None else piece(root, x)


def _is_exporting() -> bool:
    """True under torch.jit/onnx/fx/dynamo tracing, where data-dependent skipping cannot be recorded."""
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return True
    return torch.fx._symbolic_trace.is_fx_symbolic_tracing() or _in_onnx_export()


_onnx_flags: Callable[[], bool] | None = None


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export`` without its two imports per call (2 us, paid by every block
    of every eval forward): the flags it reads, looked up once."""
    global _onnx_flags
    if _onnx_flags is None:
        try:
            from torch.onnx._internal.exporter import _flags
            from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
        except ImportError:  # another torch layout: the public call
            _onnx_flags = torch.onnx.is_in_onnx_export
        else:
            _onnx_flags = lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting  # noqa: E731
    return _onnx_flags()
