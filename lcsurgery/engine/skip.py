"""Real skipping at inference: gated-off blocks and channels are not computed.

For a batch, the block runs only on the samples whose L-Net keeps it (gather, compute,
scatter-add onto the shortcut). Channels: the kept samples share one set of computed
channels, the union of their active ones; each sample's own gate values still multiply its
channels, so the result equals masked execution exactly (up to float rounding of the folded
BatchNorm). Sequential placement computes only the active filters of the first conv; parallel
placement computes the first conv in full (it ran beside the gates) and trims what follows.

Plans (folded, sliceable weights) are built on first use in eval mode and rebuilt when any
parameter or buffer they read changes (tracked through tensor version counters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcsurgery.engine.ops import ActOp, AffineOp, ConvOp, GraphOp, Op, lower_chain
from lcsurgery.fx.outline import Piece
from lcsurgery.surgery.block import GatedBlock, GateState


def _lower(piece: Piece | None, root: nn.Module, channel_dim: int) -> list[Op]:
    if piece is None:
        return []
    ops = lower_chain(piece.nodes, root, channel_dim)
    return ops if ops is not None else [GraphOp(piece, root)]


def _merge(a: list[Op], b: list[Op]) -> list[Op]:
    """Concatenate two op lists, folding a leading affine of ``b`` into a trailing conv of ``a``."""
    if a and b and isinstance(a[-1], ConvOp) and isinstance(b[0], AffineOp):
        a[-1].fold(b[0].scale, b[0].shift)
        b = b[1:]
    return a + b


def _run(ops: list[Op], x: Tensor) -> Tensor:
    for op in ops:
        x = op(x)
    return x


def _run_sliced(ops: list[Op], x: Tensor, idx: Tensor) -> Tensor:
    """Run per-channel ops on a tensor that holds only the channels in ``idx``."""
    for op in ops:
        if isinstance(op, ConvOp):
            w, b = op.rows(idx)
            x = op(x, w, b, idx.numel() if op.depthwise else None)
        else:
            x = op(x, idx)
    return x


def _sliceable_head(ops: list[Op]) -> bool:
    """First conv then per-channel ops only: every filter of every op can be trimmed."""
    if not ops or not isinstance(ops[0], ConvOp) or not ops[0].can_trim_rows:
        return False
    return all(isinstance(op, (AffineOp, ActOp)) or (isinstance(op, ConvOp) and op.depthwise) for op in ops[1:])


class BlockPlan:
    """Eval-time schedule of one gated block, with BatchNorm folded into the convs."""

    def __init__(self, block: GatedBlock) -> None:
        root, p, cd = block.root, block.pieces, block.channel_dim
        self.block = block
        self.tensors = _state_tensors(block)
        self.versions = [t._version for t in self.tensors]
        lins = [lin for lin in (block.l_net, block.c_net) if lin is not None]
        self.gate_weight = torch.cat([lin.weight.detach() for lin in lins]).t().contiguous()
        self.gate_bias = torch.cat([lin.bias.detach() for lin in lins])
        self.has_layer = block.l_net is not None
        self.has_channels = block.c_net is not None
        self.sequential = block.placement == "sequential"
        self.channel_dim = cd
        self.shortcut = _lower(p["shortcut"], root, cd)
        if self.has_channels:
            self.pre = _lower(p["pre"], root, cd)
            self.head = _merge(_lower(p["first"], root, cd), _lower(p["mid"], root, cd))
            self.between = _lower(p["between"], root, cd)
            self.tail = _merge(_lower(p["next"], root, cd), _lower(p["post"], root, cd))
            self.head_sliceable = _sliceable_head(self.head)
            self.tail_sliceable = not self.between and isinstance(self.tail[0], ConvOp) and self.tail[0].can_trim_cols
            self.channels = block.gated_channels
        else:
            self.branch = _lower(p["branch"], root, cd)

    def valid(self) -> bool:
        return all(t._version == v for t, v in zip(self.tensors, self.versions, strict=True))

    def __call__(self, x: Tensor) -> Tensor:
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        z = torch.addmm(self.gate_bias, pooled, self.gate_weight)
        z_l = z[:, 0] if self.has_layer else None
        z_c = z[:, int(self.has_layer) :] if self.has_channels else None
        s_l = z_l.clamp(0.0, 1.0) if z_l is not None else None
        self.block.last = GateState(z_l, z_c, s_l, None)
        shortcut = _run(self.shortcut, x)
        if z_l is None:
            return shortcut + self._branch(x, z_c)
        idx = (z_l > 0).nonzero().squeeze(1)
        kept = idx.numel()
        if kept == 0:
            return shortcut.clone() if shortcut is x else shortcut
        if kept == x.shape[0]:
            h = self._branch(x, z_c)
            return shortcut + h * s_l[:, None, None, None]
        h = self._branch(x.index_select(0, idx), z_c.index_select(0, idx) if z_c is not None else None)
        h = h * s_l.index_select(0, idx)[:, None, None, None]
        return shortcut.index_add(0, idx, h)

    def _branch(self, x: Tensor, z_c: Tensor | None) -> Tensor:
        if z_c is None:
            return _run(self.branch, x)
        s_c = z_c.clamp(0.0, 1.0)
        on = (z_c > 0).any(0)
        n_on = int(on.sum())
        cd = self.channel_dim
        h = _run(self.pre, x)
        if n_on == self.channels:
            h = _run(self.head, h)
            h = h * self.block.channel_view(s_c)
            return _run(self.tail, _run(self.between, h))
        idx = on.nonzero().squeeze(1) if n_on else on.new_zeros(1, dtype=torch.long)
        if self.head_sliceable and self.sequential:
            h = _run_sliced(self.head, h, idx)
        elif self.head_sliceable:
            h = _run_sliced(self.head[1:], self.head[0](h).index_select(cd, idx), idx)
        else:
            h = _run(self.head, h).index_select(cd, idx)
        h = h * self.block.channel_view(s_c.index_select(1, idx))
        if self.tail_sliceable:
            first = self.tail[0]
            return _run(self.tail[1:], first(h, first.cols(idx), first.bias))
        shape = list(h.shape)
        shape[cd] = self.channels
        full = h.new_zeros(shape).index_copy_(cd % h.dim(), idx, h)
        return _run(self.tail, _run(self.between, full))


def _state_tensors(block: GatedBlock) -> list[Tensor]:
    """Every parameter and buffer the block's plan reads, to detect changes."""
    seen: dict[int, Tensor] = {}
    for lin in (block.l_net, block.c_net):
        if lin is not None:
            for t in lin.parameters():
                seen[id(t)] = t
    for piece in block.pieces.values():
        if piece is None:
            continue
        for target in piece.module_targets():
            m = block.root.get_submodule(target)
            for t in [*m.parameters(), *m.buffers()]:
                seen[id(t)] = t
    return list(seen.values())


def skip_forward(block: GatedBlock, x: Tensor) -> Tensor:
    """Eval-mode forward of ``block`` that skips gated-off work for real."""
    if torch.is_grad_enabled():
        return block.masked_forward(x)  # autograd needs every parameter in the graph
    plan = block.engine
    if plan is None or not plan.valid():
        plan = block.engine = BlockPlan(block)
    return plan(x)
