"""Real skipping at inference: gated-off blocks and channels are not computed.

For a batch, the block runs only on the samples whose L-Net keeps it (gather, compute,
scatter-add onto the shortcut). Channels: the kept samples share one set of computed
channels, the union of their active ones; each sample's own gate values still multiply its
channels, so the result equals masked execution (up to float rounding of the folded
BatchNorm). Sequential placement computes only the active filters of the first conv; parallel
placement computes the first conv in full (it ran beside the gates) and trims what follows.

Batch 1, the case dynamic inference is for, takes a path with no tensor-level bookkeeping:
one ``tolist()`` of the gate logits gives every decision in Python, sliced weights (BatchNorm
folded in) are cached per active-channel pattern, and gate scaling is folded into the ops
(``add(alpha=s_l)``; the channel multiply is skipped when every active gate is 1).

Plans are built on first use in eval mode. They are dropped by ``train()``, ``load_state_dict``,
``.to()`` and ``GatedBlock.force``, and rebuilt when a gate parameter changes in place; after
editing other weights in place in eval mode, call ``model.eval()`` again.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from lcsurgery.engine.ops import ActOp, AffineOp, ConvOp, GraphOp, Op, lower_chain
from lcsurgery.fx.outline import Piece
from lcsurgery.engine.state import GateState

CACHE_SIZE = 64  # sliced-weight sets kept per block (one per distinct active-channel pattern)


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


def _sliceable_head(ops: list[Op]) -> bool:
    """First conv then per-channel ops only: every filter of every op can be trimmed."""
    if not ops or not isinstance(ops[0], ConvOp) or not ops[0].can_trim_rows:
        return False
    return all(isinstance(op, (AffineOp, ActOp)) or (isinstance(op, ConvOp) and op.depthwise) for op in ops[1:])


class _LazyGateState(GateState):
    """``block.last`` at batch 1: the joint gate logits, sliced into ``z_l`` / ``z_c`` only when read.

    Two slices and a dataclass cost ~5 us per block, a fiftieth of a CIFAR block's time, and
    plain inference never reads them (MAC counting does).
    """

    def __init__(self, z: Tensor, has_layer: bool, has_channels: bool) -> None:  # no super().__init__: nothing sliced yet
        self._z, self._nl, self._has_channels = z, int(has_layer), has_channels
        self.s_l = self.s_c = None

    def __getattr__(self, name: str) -> Tensor | None:
        if name == "z_l":
            value = self._z[:, 0] if self._nl else None
        elif name == "z_c":
            value = self._z[:, self._nl :] if self._has_channels else None
        else:
            raise AttributeError(name)
        setattr(self, name, value)
        return value


class _Sliced:
    """The head and next-conv weights for one set of active channels."""

    def __init__(self, plan: BlockPlan, idx: Tensor) -> None:
        self.idx = idx
        self.count = idx.numel()
        self.channel_dim = plan.channel_dim
        self.depthwise_first = plan.head_sliceable and plan.head[0].depthwise
        self.head = []  # (op, weight, bias, groups) for convs; the op itself for the rest
        for op in plan.head if plan.head_sliceable else []:
            if isinstance(op, ConvOp):
                w, b = op.rows(idx)
                self.head.append((op, w, b, self.count if op.depthwise else None))
            elif isinstance(op, AffineOp):
                self.head.append(AffineOp(op.scale.index_select(0, idx), op.shift.index_select(0, idx), op.channel_dim))
            else:
                self.head.append(op)
        self.next_weight = plan.tail[0].cols(idx) if plan.tail_sliceable else None

    def run_head(self, x: Tensor, skip_first: bool) -> Tensor:
        if not skip_first and self.depthwise_first:  # a depthwise filter reads only its own channel
            x = x.index_select(self.channel_dim, self.idx)
        for i, item in enumerate(self.head):
            if i == 0 and skip_first:
                continue
            if isinstance(item, tuple):
                op, w, b, groups = item
                x = op(x, w, b, groups)
            else:
                x = item(x)
        return x


class BlockPlan:
    """Eval-time schedule of one gated block, with BatchNorm folded into the convs."""

    def __init__(self, block: nn.Module) -> None:
        """``block``: a ``lcsurgery.GatedBlock`` (its pieces, gate layers, placement and ``last`` record)."""
        root, p, cd = block.root, block.pieces, block.channel_dim
        self.block = block
        lins = [lin for lin in (block.l_net, block.c_net) if lin is not None]
        self.gate_tensors = [t for lin in lins for t in lin.parameters()] + [block.input_mean, block.input_scale]
        self.versions = [t._version for t in self.gate_tensors]
        # the input standardisation folded into the gate layers: W (p - mean) * scale + b
        static = block.static_nets()  # static gates read no input: the bias decides
        weight = torch.cat([torch.zeros_like(lin.weight) if lin in static else lin.weight.detach() for lin in lins]) * block.input_scale
        self.gate_weight = weight.t().contiguous()
        self.gate_bias = torch.cat([lin.bias.detach() for lin in lins]) - weight @ block.input_mean
        self.pool_area, self.pool_weight = 0, self.gate_weight  # gate weights / (H * W) for the last input size
        self.has_layer = block.l_net is not None
        self.has_channels = block.c_net is not None
        self.sequential = block.placement == "sequential"
        self.channel_dim = cd
        self.shortcut = _lower(p["shortcut"], root, cd)
        self.copy_identity = not self.shortcut  # a skipped block must not hand its input out as its output
        if self.has_channels:
            self.pre = _lower(p["pre"], root, cd)
            self.head = _merge(_lower(p["first"], root, cd), _lower(p["mid"], root, cd))
            self.between = _lower(p["between"], root, cd)
            self.tail = _merge(_lower(p["next"], root, cd), _lower(p["post"], root, cd))
            self.head_sliceable = _sliceable_head(self.head)
            self.tail_sliceable = not self.between and isinstance(self.tail[0], ConvOp) and self.tail[0].can_trim_cols
            self.channels = block.gated_channels
            self.cache: OrderedDict[tuple[int, ...], _Sliced] = OrderedDict()
        else:
            self.branch = _lower(p["branch"], root, cd)

    def valid(self) -> bool:
        return [t._version for t in self.gate_tensors] == self.versions

    def sliced(self, active: tuple[int, ...], device: torch.device) -> _Sliced:
        """Sliced weights for an active-channel pattern, least recently used evicted."""
        hit = self.cache.get(active)
        if hit is None:
            hit = self.cache[active] = _Sliced(self, torch.tensor(active, dtype=torch.long, device=device))
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(active)
        return hit

    def __call__(self, x: Tensor) -> Tensor:
        area = x.shape[2] * x.shape[3]
        if area != self.pool_area:
            self.pool_area, self.pool_weight = area, self.gate_weight / area
        # The gates' global average pool as a sum, its 1 / (H * W) folded into the weights: mean()
        # is a sum and a division (~4 us at batch 1), adaptive_avg_pool2d three ops.
        z = torch.addmm(self.gate_bias, x.sum((2, 3)), self.pool_weight)
        if x.shape[0] == 1:
            return self._single(x, z)
        z_l = z[:, 0] if self.has_layer else None
        z_c = z[:, int(self.has_layer) :] if self.has_channels else None
        object.__setattr__(self.block, "last", GateState(z_l, z_c, None, None))  # a plain attribute: skip Module.__setattr__ (3 us)
        shortcut = _run(self.shortcut, x)
        if z_l is None:
            return shortcut + self._branch(x, z_c)
        s_l = z_l.clamp(0.0, 1.0)
        idx = (z_l > 0).nonzero().squeeze(1)
        kept = idx.numel()
        if kept == 0:
            return shortcut.clone() if self.copy_identity else shortcut
        if kept == x.shape[0]:
            return torch.addcmul(shortcut, self._branch(x, z_c), s_l[:, None, None, None])
        h = self._branch(x.index_select(0, idx), z_c.index_select(0, idx) if z_c is not None else None)
        h = h * s_l.index_select(0, idx)[:, None, None, None]
        return shortcut.index_add(0, idx, h)

    def _single(self, x: Tensor, z: Tensor) -> Tensor:
        """Batch of one: every decision as a Python number, cached sliced weights, folded scales."""
        values = z[0].tolist()
        nl = int(self.has_layer)
        object.__setattr__(self.block, "last", _LazyGateState(z, self.has_layer, self.has_channels))
        shortcut = _run(self.shortcut, x)
        s_l = min(values[0], 1.0) if nl else 1.0
        if s_l <= 0:
            return shortcut.clone() if self.copy_identity else shortcut
        if not self.has_channels:
            return torch.add(shortcut, _run(self.branch, x), alpha=s_l)
        zc = values[nl:]
        h = _run(self.pre, x)
        if min(zc) > 0:  # every channel on
            h = _run(self.head, h)
            if min(zc) < 1.0:
                h = h * self.block.channel_view(z[:, nl:].clamp(0.0, 1.0))
            return torch.add(shortcut, _run(self.tail, _run(self.between, h)), alpha=s_l)
        active = tuple(i for i, v in enumerate(zc) if v > 0)
        sl = self.sliced(active or (0,), x.device)
        if self.head_sliceable and self.sequential:
            h = sl.run_head(h, skip_first=False)
        elif self.head_sliceable:
            h = sl.run_head(self.head[0](h).index_select(self.channel_dim, sl.idx), skip_first=True)
        else:
            h = _run(self.head, h).index_select(self.channel_dim, sl.idx)
        if not active or any(zc[i] < 1.0 for i in active):
            h = h * self.block.channel_view(z[:, nl:].index_select(1, sl.idx).clamp(0.0, 1.0))
        if self.tail_sliceable:
            first = self.tail[0]
            h = _run(self.tail[1:], first(h, sl.next_weight, first.bias))
        else:
            h = self._scatter_tail(h, sl.idx)
        return torch.add(shortcut, h, alpha=s_l)

    def _branch(self, x: Tensor, z_c: Tensor | None) -> Tensor:
        if z_c is None:
            return _run(self.branch, x)
        s_c = z_c.clamp(0.0, 1.0)
        on = (z_c > 0).any(0)
        n_on = int(on.sum())
        cd = self.channel_dim
        h = _run(self.pre, x)
        if n_on == self.channels:
            h = self._scale_channels(_run(self.head, h), s_c)
            return _run(self.tail, _run(self.between, h))
        idx = on.nonzero().squeeze(1) if n_on else on.new_zeros(1, dtype=torch.long)
        sl = self.sliced(tuple(idx.tolist()), x.device)
        if self.head_sliceable and self.sequential:
            h = sl.run_head(h, skip_first=False)
        elif self.head_sliceable:
            h = sl.run_head(self.head[0](h).index_select(cd, idx), skip_first=True)
        else:
            h = _run(self.head, h).index_select(cd, idx)
        h = self._scale_channels(h, s_c.index_select(1, idx))
        if self.tail_sliceable:
            first = self.tail[0]
            return _run(self.tail[1:], first(h, sl.next_weight, first.bias))
        return self._scatter_tail(h, idx)

    def _scale_channels(self, h: Tensor, s_c: Tensor) -> Tensor:
        """Multiply by the channel gates unless all are 1 (open, or saturated trained gates): one
        pass over the block's widest tensor saved for a check on a [B, C] one."""
        return h * self.block.channel_view(s_c) if bool((s_c < 1).any()) else h

    def _scatter_tail(self, h: Tensor, idx: Tensor) -> Tensor:
        """Put the computed channels back among zeros and run the rest of the branch on all channels."""
        cd = self.channel_dim % h.dim()
        shape = list(h.shape)
        shape[cd] = self.channels
        full = h.new_zeros(shape).index_copy_(cd, idx, h)
        return _run(self.tail, _run(self.between, full))

