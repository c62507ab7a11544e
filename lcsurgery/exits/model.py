"""``add_exits``: attach early-exit heads to a pretrained network; ``ExitModel`` runs it so that
each image leaves at the first exit its policy accepts, and the rest of the batch goes on.

With no policy set (the state after ``add_exits``) the model computes exactly what the original
does and runs no head; ``lcsurgery.exits.policy.set_budget`` sets one. Every forward records
where each image left (``last_exit``) and the MACs it cost (``last_macs``): the segments it ran
and the heads it evaluated, the same count fvcore gives for the truncated network.

The network may be one converted by ``lcsurgery.convert``: exits then go between its gated
blocks, and an image's cost is the truncated network's with its own gate decisions (what
``count_macs`` charges each block) plus the heads it evaluated.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Sequence

import torch
from torch import Tensor, fx, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.heads import ExitHead
from lcsurgery.exits.split import CutPoint, compile_segment, cut_points, segment_graphs
from lcsurgery.fx.ops import conv_macs, tensor_shape
from lcsurgery.fx.tracer import training_mode
from lcsurgery.macs.static import CallModule, fvcore_macs, probing, static_costs
from lcsurgery.surgery.block import GatedBlock
from lcsurgery.surgery.convert import resolve_input_size, tensor_kwargs, trace_with_shapes
from lcsurgery.surgery.model import GATE_PREFIX, LCModel, record_input_size, unwrap

# Shallow-Deep Networks' exit places: these fractions of the network's MACs.
SDN_FRACTIONS = (0.15, 0.3, 0.45, 0.6, 0.75, 0.9)


def exit_features(logits: Tensor) -> Tensor:
    """[B, 3] what a learned policy reads from a head's output: the top softmax probability, its
    margin over the second, and the entropy over its maximum (log of the number of classes)."""
    probs = logits.float().softmax(1)
    top2 = probs.topk(2, dim=1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1) / math.log(probs.shape[1])
    return torch.stack([top2[:, 0], top2[:, 0] - top2[:, 1], entropy], 1)


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """Where images leave: at exit i when its score reaches ``thresholds[i]``, or at the last exit
    that keeps the image within ``max_macs``. The score is the head's top softmax probability, or
    with a ``scorer`` (one row of weights per exit, over ``exit_features`` and a bias) the learned
    probability that leaving there loses nothing against the network's own head."""

    thresholds: tuple[float, ...]
    max_macs: int | None = None
    scorer: tuple[tuple[float, ...], ...] | None = None
    off: tuple[int, ...] = ()  # exits whose heads are not run (nor charged): they take too few images to pay for their time

    def runs(self, i: int) -> bool:
        """Whether exit ``i``'s head is evaluated."""
        return i not in self.off

    def scores(self, i: int, features: Tensor) -> Tensor:
        """[B] exit ``i``'s score from its ``exit_features``."""
        if self.scorer is None:
            return features[:, 0]
        w = torch.tensor(self.scorer[i], dtype=features.dtype, device=features.device)
        return torch.sigmoid(features @ w[:-1] + w[-1])

    def score_logits(self, i: int, logits: Tensor) -> Tensor:
        """[B] exit ``i``'s score from its head's logits; the confidence rule computes the top
        probability alone (the same number as ``exit_features``' first column, a third of the time
        at batch 1, where each declined head's ops are what an early exit pays for)."""
        if self.scorer is None:
            return logits.float().softmax(1).amax(1)
        return self.scores(i, exit_features(logits))

    def forced_exit(self, costs: list[int]) -> int | None:
        """The exit every image still running leaves at, because going on to the next exit that
        runs could pass ``max_macs`` (``costs``: ``ExitModel.exit_costs`` under this policy, the
        most an image can cost at each exit); None: no cap."""
        if self.max_macs is None:
            return None
        running = [i for i in range(len(costs) - 1) if self.runs(i)] + [len(costs) - 1]
        return next((i for i, j in zip(running, running[1:]) if costs[j] > self.max_macs), None)


@dataclasses.dataclass(frozen=True)
class ExitPoint:
    """One place an exit can go: its name, the feature map's shape there, and the share of the
    network's MACs spent before it."""

    name: str
    names: tuple[str, ...]
    shape: tuple[int, ...]
    macs: int
    fraction: float

    def __str__(self) -> str:
        return f"{self.name:<24} {str(list(self.shape[1:])):<16} {self.fraction:6.1%} of the MACs"


class ExitModel(nn.Module):
    """A network with early exits: ``backbone`` (the original weights, under their names), the
    ``heads`` and the compiled segments between them."""

    def __init__(self, backbone: nn.Module, graph: fx.Graph, points: list[ExitPoint], cuts: list[fx.Node], num_classes: int, input_size: tuple[int, int, int], pool: int, hidden: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleList(ExitHead(p.shape[1], num_classes, pool, hidden) for p in points)
        self.points = points
        self.input_size = tuple(input_size)
        self.policy: ExitPolicy | None = None
        self.last_exit: Tensor | None = None
        self._last_macs: Tensor | None = None
        self._pending: tuple[int, tuple[int, ...], tuple[int, ...]] | None = None  # batch 1 with gates: (exit, input size, heads off), counted when read
        self.last_exit_costs: Tensor | None = None
        graphs = segment_graphs(graph, cuts)
        self._segments = [compile_segment(backbone, g) for g in graphs]
        self._gated = isinstance(backbone, LCModel)
        # the gated blocks each segment calls, by their index in the converted model
        order = {f"{GATE_PREFIX}.{key}": j for j, key in enumerate(backbone.lc_gates)} if self._gated else {}
        self._blocks = [[order[n.target] for n in g.nodes if n.op == "call_module" and n.target in order] for g in graphs]
        self._costs: dict[tuple, _Costs] = {}  # per input size and placement
        p = next(backbone.parameters(), None)
        if p is not None:
            self.heads.to(p.device, p.dtype)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def block_segments(self) -> dict[str, int]:
        """Each gated block's name and the segment it runs in: an image that leaves at exit i
        computes the blocks of segments 0 to i (empty for a network without gates)."""
        if not self._gated:
            return {}
        names = [b.name for b in self.backbone.lc_blocks()]
        return {names[j]: i for i, blocks in enumerate(self._blocks) for j in blocks}

    def segment(self, i: int, x: Tensor) -> Tensor:
        """Run segment ``i``: the input to exit 0's map for i = 0, ..., the last exit's map to the output."""
        return self._segments[i](self.backbone, x)

    def exit_costs(self, input_size: tuple[int, ...] | None = None, off: Sequence[int] = ()) -> list[int]:
        """MACs of an image that leaves at exit i (segments up to it, the heads 0..i that run: all
        but ``off``), and last the MACs of one that runs to the end; counted by fvcore once per size.
        With gates, every gate open: the most an image can cost there (``last_macs`` has its own)."""
        size = tuple(input_size or self.input_size)
        c, heads = self._counts(size), self.head_macs(size, off)
        spent = [sum(c.segments[: i + 1]) + sum(heads[: i + 1]) for i in range(self.num_exits)]
        return [*spent, sum(c.segments) + sum(heads)]

    def head_macs(self, input_size: tuple[int, ...] | None = None, off: Sequence[int] = ()) -> list[int]:
        """MACs of each exit head (0 for the heads ``off``, which are not run)."""
        return [0 if i in off else m for i, m in enumerate(self._counts(tuple(input_size or self.input_size)).heads)]

    def dense_macs(self, input_size: tuple[int, ...] | None = None) -> int:
        """MACs of the original network (no head run, no gate; for a pruned run's network, before pruning)."""
        return self._counts(tuple(input_size or self.input_size)).dense

    def _counts(self, size: tuple[int, ...]) -> _Costs:
        placement = self.backbone.placement if self._gated else None
        if (size, placement) not in self._costs:
            x = torch.zeros(1, *size, **tensor_kwargs(self.backbone))
            segments, heads = [], []
            with training_mode(self, False), torch.no_grad(), probing(self.backbone) if self._gated else contextlib.nullcontext():
                for i in range(self.num_exits + 1):
                    segments.append(fvcore_macs(CallModule(lambda t, i=i: self.segment(i, t), self.backbone), (x,)))
                    x = self.segment(i, x)
                    if i < self.num_exits:
                        heads.append(fvcore_macs(self.heads[i], (x,)))
            if self._gated:
                costs = static_costs(self.backbone, size)
                full = torch.tensor([b.fixed(placement) + b.channels * b.per_channel(placement) for b in costs.blocks])
                unit = torch.tensor([b.per_channel(placement) for b in costs.blocks])
                self._costs[size, placement] = _Costs(segments, heads, costs.dense, full, unit)
            else:
                pruned = getattr(self.backbone, "lc_pruned", None)  # a pruned finetune run: dense is the network before pruning
                dense = pruned["reference_macs"] if pruned and size == tuple(self.input_size) else sum(segments)
                self._costs[size, placement] = _Costs(segments, heads, dense)
        return self._costs[size, placement]

    def _spent(self, i: int, size: tuple[int, ...], n: int) -> Tensor:
        """int64 [n]: MACs segment ``i`` cost each image of its latest call: its count with every
        gate open, less what each image's gates skipped (as ``count_macs`` charges a block)."""
        c = self._counts(size)
        spent = torch.full((n,), c.segments[i], dtype=torch.long)
        blocks = list(self.backbone.lc_blocks()) if self._blocks[i] else []
        for j in self._blocks[i]:
            state = blocks[j].last
            keep = state.keep().cpu().long()
            active = state.active()
            paid = c.full[j] if active is None else c.full[j] - (active.shape[1] - active.sum(1).cpu()) * c.unit[j]
            spent -= c.full[j] - keep * paid
        return spent

    def forward_exits(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits and last the network's own, for the whole batch (training, calibration).
        Records ``last_exit_costs`` [B, exits + 1]: what each image would cost leaving at each exit,
        and for a gated backbone its input size, so its gates' MACs and penalties read this batch."""
        outs, spent, size = [], [], tuple(x.shape[1:])
        if self._gated:
            record_input_size(self.backbone, (x,))
        heads = self._counts(size).heads
        total = torch.zeros(len(x), dtype=torch.long)
        for i in range(self.num_exits):
            x = self.segment(i, x)
            total = total + self._spent(i, size, len(x))
            outs.append(self.heads[i](x))
            total = total + heads[i]
            spent.append(total)
        outs.append(self.segment(self.num_exits, x))
        spent.append(total + self._spent(self.num_exits, size, len(x)))
        self.last_exit_costs = torch.stack(spent, 1)
        return outs

    def forward(self, x: Tensor) -> Tensor:
        if self.policy is None:
            out, size = x, tuple(x.shape[1:])
            macs = torch.zeros(len(x), dtype=torch.long)
            for i in range(self.num_exits + 1):
                out = self.segment(i, out)
                macs += self._spent(i, size, len(x))
            self._record(torch.full((len(x),), self.num_exits), macs)
            return out
        return self._run_policy(x, self.policy)

    def _run_policy(self, x: Tensor, policy: ExitPolicy) -> Tensor:
        """Each image leaves at the first exit the policy accepts; the images that go on are
        gathered into a smaller batch, so later segments run only for them."""
        size = tuple(x.shape[1:])
        costs = self.exit_costs(size, policy.off)
        check_cap(policy, costs)
        forced = policy.forced_exit(costs)
        heads = self.head_macs(size, policy.off)
        if len(x) == 1:
            return self._run_one(x, policy, costs, forced, size)
        n = len(x)
        exit_of = torch.full((n,), self.num_exits, dtype=torch.long)
        macs = torch.zeros(n, dtype=torch.long)
        idx = torch.arange(n, device=x.device)
        out: Tensor | None = None
        h = x
        for i in range(self.num_exits):
            h = self.segment(i, h)
            macs[idx.cpu()] += self._spent(i, size, len(h)) + heads[i]
            if not policy.runs(i):
                continue
            logits = self.heads[i](h)
            if out is None:
                out = logits.new_empty((n, *logits.shape[1:]))
            leave = policy.score_logits(i, logits) >= policy.thresholds[i]
            if i == forced:
                leave = torch.ones_like(leave)  # going on could pass the cap: everyone left leaves here
            out[idx[leave]] = logits[leave]
            exit_of[idx[leave].cpu()] = i
            h, idx = h[~leave], idx[~leave]
            if not len(idx):
                break
        if len(idx):
            out[idx] = self.segment(self.num_exits, h)
            macs[idx.cpu()] += self._spent(self.num_exits, size, len(h))
        self._record(exit_of, macs)
        return out

    def _run_one(self, x: Tensor, policy: ExitPolicy, costs: list[int], forced: int | None, size: tuple[int, ...]) -> Tensor:
        """Batch 1: the same decisions with no gathering and no bookkeeping on the way: with gates,
        the image's cost is counted from its gates' states only when ``last_macs`` is read."""
        for i in range(self.num_exits):
            x = self.segment(i, x)
            if not policy.runs(i):
                continue
            logits = self.heads[i](x)
            if i == forced or float(policy.score_logits(i, logits)[0]) >= policy.thresholds[i]:
                self._record_one(i, size, costs, policy.off)
                return logits
        out = self.segment(self.num_exits, x)
        self._record_one(self.num_exits, size, costs, policy.off)
        return out

    def _record_one(self, exit_of: int, size: tuple[int, ...], costs: list[int], off: tuple[int, ...]) -> None:
        if self._gated:
            self.last_exit, self._last_macs, self._pending = torch.tensor([exit_of]), None, (exit_of, size, off)
        else:
            self._record(torch.tensor([exit_of]), torch.tensor([costs[exit_of]]))

    @property
    def last_macs(self) -> Tensor | None:
        """int64 [B]: what each image of the latest forward cost (read it before the next forward:
        at batch 1 with gates it is counted from the gates' states when read)."""
        if self._pending is not None:
            i, size, off = self._pending
            spent = sum(int(self._spent(j, size, 1)) for j in range(i + 1)) + sum(self.head_macs(size, off)[: i + 1])
            self._last_macs, self._pending = torch.tensor([spent]), None
        return self._last_macs

    def _record(self, exit_of: Tensor, macs: Tensor) -> None:
        self.last_exit, self._last_macs, self._pending = exit_of, macs.long(), None

    def extra_repr(self) -> str:
        return f"exits at {', '.join(p.name for p in self.points)}"


@dataclasses.dataclass(frozen=True)
class _Costs:
    """MACs per image at one input size: each segment's (every gate open), each head's, the
    original network's; for a gated backbone, per block, what a kept block with every channel
    on pays beyond its gates and shortcut (``full``) and what one active channel adds (``unit``)."""

    segments: list[int]
    heads: list[int]
    dense: int
    full: Tensor | None = None
    unit: Tensor | None = None




def check_cap(policy: ExitPolicy, costs: list[int]) -> None:
    """Raise where ``policy`` cannot be run: its cap is below the cheapest exit whose head runs, or
    it names exits that do not exist (``costs``: ``ExitModel.exit_costs`` under the policy)."""
    k = len(costs) - 1
    if len(policy.thresholds) != k or any(not 0 <= i < k for i in policy.off):
        raise LCSurgeryError(f"the policy has {len(policy.thresholds)} thresholds and heads off at {list(policy.off)}, the model {k} exits")
    first = next((i for i in range(k) if policy.runs(i)), k)
    if policy.max_macs is not None and policy.max_macs < costs[first]:
        raise LCSurgeryError(f"max_macs={policy.max_macs:,} is below the cheapest exit ({costs[first]:,} MACs per image): no image can meet it")


def exit_points(model: nn.Module, *, input_size: tuple[int, int, int] | None = None, leaf_modules: Sequence[str | type] = ()) -> list[ExitPoint]:
    """Dry run of ``add_exits``: every place an exit can go, with the share of MACs before it."""
    _, _, points, _ = _analyse(copy.deepcopy(model), input_size, leaf_modules)
    return points


def add_exits(
    model: nn.Module,
    at: str | Sequence[float] | Sequence[str] = "macs",
    *,
    num_classes: int | None = None,
    input_size: tuple[int, int, int] | None = None,
    pool: int = 4,
    hidden: int = 0,
    leaf_modules: Sequence[str | type] = (),
) -> ExitModel:
    """Return a copy of ``model`` with early-exit heads; ``model`` is untouched.

    Args:
        at: ``"macs"`` (default): exits where 15, 30, 45, 60, 75 and 90% of the network's MACs
            are spent, as Shallow-Deep Networks places them; a list of such fractions; or a list
            of module names (``"layer2.1"``) after which to exit (``exit_points`` lists them).
        num_classes: the heads' outputs (default: the width of the model's output).
        input_size: (C, H, W) of an example input (default: the model's own, else 3 x 224 x 224).
        pool: each head pools its feature map to ``pool`` x ``pool`` before its linear layer.
        hidden: width of a hidden layer in each head (0: the linear head of Shallow-Deep Networks).

    ``model`` may be converted by ``lcsurgery.convert`` (gated): exits then go between its blocks,
    named and placed as in the original network. With no policy set the result computes exactly what ``model`` does; set one with
    ``lcsurgery.exits.policy.set_budget``.
    """
    if not isinstance(model, LCModel) and any(isinstance(m, GatedBlock) for m in model.modules()):
        unwrap(model)  # a wrapped converted model: says to pass the converted model itself
    root = copy.deepcopy(model)
    graph, size, points, nodes = _analyse(root, input_size, leaf_modules)
    chosen = _choose(points, at)
    out_shape = _output_shape(graph)
    classes = num_classes or out_shape[-1]
    exits = ExitModel(root, graph, [points[i] for i in chosen], [nodes[i] for i in chosen], classes, size, pool, hidden)
    exits.train(model.training)
    return exits


def _analyse(root: nn.Module, input_size: tuple[int, int, int] | None, leaf_modules: Sequence[str | type]) -> tuple[fx.Graph, tuple, list[ExitPoint], list[fx.Node]]:
    size = resolve_input_size(root, input_size)
    own = None
    if isinstance(root, LCModel):  # its own graph: each gated block one call, every node still knows its original module
        own = fx.Graph()
        own.output(own.graph_copy(root.lc_graph_module.graph, {}))
    graph = trace_with_shapes(root, leaf_modules, size, graph=own)
    cuts: list[CutPoint] = cut_points(graph)
    if not cuts:
        raise LCSurgeryError(f"{type(root).__name__} never narrows to a single feature map, so no exit can be attached")
    macs = _macs_before(graph, root, [c.node for c in cuts], size)
    total = macs[-1]
    kept = [
        k for k in range(len(cuts))
        if (k + 1 == len(cuts) or macs[k + 1] != macs[k])  # of a run of places with no MAC between them (conv, norm, activation), the last
        and total - macs[k] >= 0.01 * total  # an exit where under 1% of the work is left saves nothing
    ]  # fmt: skip
    points = [ExitPoint(cuts[k].name, cuts[k].names, cuts[k].shape, macs[k], macs[k] / total) for k in kept]
    return graph, size, points, [cuts[k].node for k in kept]


def _macs_before(graph: fx.Graph, root: nn.Module, cuts: list[fx.Node], size: tuple[int, int, int]) -> list[int]:
    """Conv and linear MACs spent up to each cut (from the recorded shapes; a gated block counts
    as the original block), and last the whole network's: enough to place exits; what an exit
    costs is counted by fvcore once it is placed."""
    at = set(cuts)
    blocks = {f"{GATE_PREFIX}.{key}": b.dense for key, b in zip(root.lc_gates, static_costs(root, size).blocks, strict=True)} if isinstance(root, LCModel) else {}
    totals, total = [], 0
    for n in graph.nodes:
        if n.op == "call_module":
            total += blocks[n.target] if n.target in blocks else conv_macs(n, root)
        if n in at:
            totals.append(total)
    return [*totals, total]


def _choose(points: list[ExitPoint], at: str | Sequence[float] | Sequence[str]) -> list[int]:
    if isinstance(at, str):
        if at != "macs":
            raise LCSurgeryError(f"at={at!r}: use 'macs', a list of MAC fractions, or a list of module names")
        at = SDN_FRACTIONS
    at = list(at)
    if not at:
        raise LCSurgeryError("at is empty: give at least one exit place")
    if all(isinstance(a, str) for a in at):
        chosen = []
        for name in at:
            hits = [i for i, p in enumerate(points) if name in p.names or name == p.name]
            if not hits:
                known = ", ".join(p.name for p in points)
                raise LCSurgeryError(f"no exit can go after {name!r}: the network narrows to one feature map only after {known}")
            chosen.append(hits[0])
    elif all(isinstance(a, (int, float)) for a in at):
        bad = [a for a in at if not 0 < a < 1]
        if bad:
            raise LCSurgeryError(f"exit MAC fractions must be in (0, 1), got {bad}")
        chosen = [min(range(len(points)), key=lambda i: abs(points[i].fraction - a)) for a in at]
    else:
        raise LCSurgeryError(f"at mixes names and fractions: {at}")
    chosen = sorted(set(chosen))
    return chosen


def _output_shape(graph: fx.Graph) -> tuple[int, ...]:
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    shape = tensor_shape(out) if isinstance(out, fx.Node) else None
    if shape is None or len(shape) != 2:
        raise LCSurgeryError(f"exits need a model whose output is one [batch, classes] tensor, this one returns {shape or type(out).__name__}")
    return shape
