"""Find residual blocks in a traced graph and decide where each one's gates go.

A candidate is every addition of two tensors computed from the input. Its *block input* is the
immediate dominator of the add (the fork point); the two operands are the branch and the
shortcut. The branch is the side with more convolution work; the shortcut may be the identity,
a downsampling conv, pooling, or any parameter-free function.

The C-Net gate is placed by walking the branch's dominator chain: a conv-like *first conv*,
then per-channel ops only (norm, activation, depthwise conv) up to the *gate point*, then
zero-preserving ops only (e.g. a squeeze-excitation multiply) up to the *next conv*. If the
first conv-like op on the chain does not fit (ConvNeXt: LayerNorm mixes channels after the
depthwise conv) the next candidate is tried (ConvNeXt: fc1 -> GELU -> fc2). If none fits the
block gets a layer gate only, and the reason is reported.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import fx, nn

from lcsurgery.fx import ops
from lcsurgery.fx.graph import (
    ancestors_within,
    data_nodes,
    dominator_chain,
    escaping_node,
    immediate_dominators,
    topo_sorted,
)
from lcsurgery.fx.tracer import module_path


@dataclass
class ChannelGatePlan:
    """Where a block's C-Net acts: the first conv, the gate point and the next conv."""

    first: fx.Node
    gate_point: fx.Node  # the first conv itself, or the last per-channel op after it
    next: fx.Node
    channels: int
    channel_dim: int  # 1 for NCHW convs, -1 for channels-last Linear layers (ConvNeXt MLP)


@dataclass
class BlockSpec:
    """One residual join ``branch(x) + shortcut(x)`` and the gates planned for it."""

    name: str
    input: fx.Node
    join: fx.Node
    branch_out: fx.Node
    shortcut_out: fx.Node  # equals ``input`` for an identity shortcut
    branch: list[fx.Node]  # topological order, ``input`` excluded
    shortcut: list[fx.Node]
    in_channels: int
    layer_gate: bool = True
    channel: ChannelGatePlan | None = None
    notes: list[str] = field(default_factory=list)

    def _at(self, node: fx.Node) -> int:
        return self.branch.index(node)

    @property
    def pre(self) -> list[fx.Node]:
        """Branch ops before the first conv (e.g. pre-activation BN-ReLU)."""
        return self.branch[: self._at(self.channel.first)] if self.channel else []

    @property
    def mid(self) -> list[fx.Node]:
        """Per-channel ops from the first conv's output up to and including the gate point."""
        c = self.channel
        return self.branch[self._at(c.first) + 1 : self._at(c.gate_point) + 1] if c else []

    @property
    def between(self) -> list[fx.Node]:
        """Zero-preserving ops (and their side paths, e.g. squeeze-excitation) before the next conv."""
        c = self.channel
        return self.branch[self._at(c.gate_point) + 1 : self._at(c.next)] if c else []

    @property
    def post(self) -> list[fx.Node]:
        """Branch ops after the next conv."""
        return self.branch[self._at(self.channel.next) + 1 :] if self.channel else []


@dataclass
class Rejected:
    """A residual-looking join that is not gated, and why."""

    name: str
    reason: str


@dataclass
class BlockOptions:
    """User choices that shape the search."""

    layers: bool = True
    channels: bool = True
    exclude: tuple[str, ...] = ()


def _block_name(join: fx.Node) -> str:
    return module_path(join) or join.name


def _is_4d(node: fx.Node) -> bool:
    shape = ops.tensor_shape(node)
    return shape is not None and len(shape) == 4


def find_residual_blocks(
    graph: fx.Graph, root: nn.Module, options: BlockOptions
) -> tuple[list[BlockSpec], list[Rejected]]:
    """All gateable residual blocks of a shape-annotated graph, in forward order, plus rejections."""
    nodes = data_nodes(graph)
    reach = set(nodes)
    idom = immediate_dominators(nodes)
    candidates: list[BlockSpec] = []
    rejected: list[Rejected] = []
    for node in nodes:
        if not ops.is_add(node) or not all(a in reach for a in node.args):
            continue
        if not all(_is_4d(a) for a in node.args) or ops.tensor_shape(node.args[0]) != ops.tensor_shape(node.args[1]):
            continue  # broadcasting adds (biases, positional terms) are not residual joins
        spec = _analyse_join(node, root, idom, reach, graph)
        if isinstance(spec, Rejected):
            rejected.append(spec)
        else:
            candidates.append(spec)
    _name_uniquely(candidates)
    blocks = _drop_nested(candidates, rejected)
    accepted = []
    for spec in blocks:
        if any(fnmatch.fnmatchcase(spec.name, pat) for pat in options.exclude):
            rejected.append(Rejected(spec.name, "excluded by the user (exclude=...)"))
            continue
        _plan_gates(spec, root, idom, options)
        if not spec.layer_gate and spec.channel is None:
            rejected.append(Rejected(spec.name, "; ".join(spec.notes) or "no gate requested"))
            continue
        accepted.append(spec)
    return accepted, rejected


def _analyse_join(
    join: fx.Node, root: nn.Module, idom: dict, reach: set[fx.Node], graph: fx.Graph
) -> BlockSpec | Rejected:
    name = _block_name(join)
    start = idom[join]
    if start is None:
        return Rejected(name, "the two operands come from different graph inputs")
    a, b = join.args
    side_a = ancestors_within(a, start, reach) if a is not start else set()
    side_b = ancestors_within(b, start, reach) if b is not start else set()
    if side_a & side_b:
        return Rejected(name, "branch and shortcut share intermediate values")
    leak = escaping_node(side_a | side_b | {join}, {join})
    if leak is not None:
        return Rejected(name, f"intermediate value {leak.name!r} is used outside the block")
    macs_a = sum(ops.conv_macs(n, root) for n in side_a)
    macs_b = sum(ops.conv_macs(n, root) for n in side_b)
    if macs_a == 0 and macs_b == 0:
        return Rejected(name, "neither operand of the add runs a convolution or linear layer")
    if not _is_4d(start):
        return Rejected(name, "the block input is not a 4-D (N, C, H, W) feature map")
    (branch_out, branch), (shortcut_out, shortcut) = ((a, side_a), (b, side_b))
    if macs_b > macs_a:
        (branch_out, branch), (shortcut_out, shortcut) = ((b, side_b), (a, side_a))
    return BlockSpec(
        name=name,
        input=start,
        join=join,
        branch_out=branch_out,
        shortcut_out=shortcut_out,
        branch=topo_sorted(branch, graph),
        shortcut=topo_sorted(shortcut, graph),
        in_channels=ops.tensor_shape(start)[1],
    )


def _name_uniquely(specs: list[BlockSpec]) -> None:
    seen: dict[str, int] = {}
    for spec in specs:
        count = seen.get(spec.name, 0)
        seen[spec.name] = count + 1
        if count:
            spec.name = f"{spec.name}@{count}"


def _drop_nested(candidates: list[BlockSpec], rejected: list[Rejected]) -> list[BlockSpec]:
    """Keep the innermost of nested residual joins: the outer one's branch holds the inner one."""
    joins = {c.join: c for c in candidates}
    kept = []
    for spec in candidates:
        inner = [joins[n].name for n in spec.branch + spec.shortcut if n in joins]
        if inner:
            rejected.append(Rejected(spec.name, f"contains the residual block {inner[0]!r}; only the inner one is gated"))
        else:
            kept.append(spec)
    return kept


def _plan_gates(spec: BlockSpec, root: nn.Module, idom: dict, options: BlockOptions) -> None:
    spec.layer_gate = options.layers
    if not options.layers:
        spec.notes.append("layer gate off (layers=False)")
    if not options.channels:
        spec.notes.append("channel gate off (channels=False)")
        return
    chain = dominator_chain(spec.branch_out, spec.input, idom)
    reasons = []
    for i, node in enumerate(chain):
        if not ops.is_conv_like(node, root):
            continue
        plan = _channel_plan_from(node, chain[i + 1 :], root)
        if isinstance(plan, ChannelGatePlan):
            spec.channel = plan
            if reasons:
                spec.notes.append(f"C-Net moved to {plan.first.target} -> {plan.next.target} ({reasons[0]})")
            return
        reasons.append(plan)
    spec.notes.append("layer gate only: " + (reasons[0] if reasons else "no conv on the branch's main path"))


def _channel_plan_from(first: fx.Node, rest: list[fx.Node], root: nn.Module) -> ChannelGatePlan | str:
    """Try ``first`` as the gated conv; return the plan or the reason it does not fit."""
    m = root.get_submodule(first.target)
    channel_dim = 1 if isinstance(m, nn.Conv2d) else -1
    channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
    if isinstance(m, nn.Linear) and not _is_4d(first):
        return f"{first.target} is a Linear layer on a non-spatial tensor"
    cur, i = first, 0
    while i < len(rest) and len(cur.users) == 1 and ops.is_per_channel(rest[i], root, cur):
        cur = rest[i]
        i += 1
    gate_point = cur
    while i < len(rest):
        node = rest[i]
        if ops.is_conv_like(node, root) and _single_input(node) is cur:
            nm = root.get_submodule(node.target)
            if isinstance(nm, nn.Linear) != isinstance(m, nn.Linear):
                return f"{node.target} reads the gated channels in a different layout"
            if ops.is_depthwise(nm):
                return f"{node.target} is depthwise after the gate point"
            return ChannelGatePlan(first, gate_point, node, channels, channel_dim)
        if not ops.is_zero_preserving(node, root, cur, channel_dim):
            return f"{_describe(node, root)} after {gate_point.target if gate_point.op == 'call_module' else gate_point.name} mixes or shifts channels"
        if len(cur.users) > 1 and not _users_feed_only(cur, node):
            return f"{cur.name} is read by more than the next op"
        cur = node
        i += 1
    return f"no conv reads the output of {first.target} channel by channel"


def _single_input(node: fx.Node) -> fx.Node | None:
    inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
    return inputs[0] if len(inputs) == 1 else None


def _users_feed_only(src: fx.Node, sink: fx.Node) -> bool:
    """Every path out of ``src`` ends in ``sink`` (a squeeze-excitation side path, for instance)."""
    todo, seen = list(src.users), set()
    while todo:
        n = todo.pop()
        if n is sink or n in seen:
            continue
        if n.op == "output":
            return False
        seen.add(n)
        todo.extend(n.users)
    return True


def _describe(node: fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return f"{type(root.get_submodule(node.target)).__name__} ({node.target})"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def sanitize(name: str) -> str:
    """A block name as a module attribute name: ``layer1.0`` -> ``layer1_0``."""
    return re.sub(r"\W", "_", name)
