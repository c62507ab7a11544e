"""Where a network can carry an exit, and the network cut into segments at those places.

An exit can go after any node at which the whole forward pass narrows to one feature map: no
earlier value is read later, so everything after it is a function of that map alone (in a
ResNet, every block's output). Cutting the fx graph at such nodes gives segments whose
composition is the original forward, node for node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch import Tensor, fx, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.fx.graph import data_nodes
from lcsurgery.fx.ops import tensor_shape
from lcsurgery.fx.tracer import module_path


@dataclasses.dataclass(frozen=True)
class CutPoint:
    """A node after which the forward pass depends on one 4-D feature map only."""

    node: fx.Node
    names: tuple[str, ...]  # the modules that end at this node, outermost first ("layer1", "layer1.2")
    shape: tuple[int, ...]  # the feature map's shape on the example input

    @property
    def name(self) -> str:
        return self.names[0] if self.names else self.node.name


def cut_points(graph: fx.Graph) -> list[CutPoint]:
    """Every node (in forward order) after which only its own 4-D output is live; the graph must
    carry ShapeProp's shapes."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise LCSurgeryError(f"exits need a forward with one input, this one takes {len(placeholders)} ({', '.join(p.name for p in placeholders)})")
    pos = {n: i for i, n in enumerate(graph.nodes)}
    last_node_of: dict[str, fx.Node] = {}
    for n in graph.nodes:
        path = module_path(n)
        parts = path.split(".") if path else []
        for k in range(1, len(parts) + 1):
            last_node_of[".".join(parts[:k])] = n
    points, live_until = [], -1
    for n in data_nodes(graph):
        shape = tensor_shape(n)
        if n.op != "placeholder" and n.users and live_until <= pos[n] and shape is not None and len(shape) == 4:
            parts = module_path(n).split(".") if module_path(n) else []
            names = tuple(p for p in (".".join(parts[:k]) for k in range(1, len(parts) + 1)) if last_node_of[p] is n)
            points.append(CutPoint(n, names, shape))
        live_until = max([live_until, *(pos[u] for u in n.users)])
    return points


def segment_graphs(graph: fx.Graph, cuts: list[fx.Node]) -> list[fx.Graph]:
    """The graph cut after each of ``cuts`` (in forward order): segment 0 maps the input to the
    first cut's value, segment i the value at cut i-1 to the value at cut i, the last one the last
    cut's value to the model's output. Parameter-only nodes are copied where they are used."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    if [order[c] for c in cuts] != sorted(order[c] for c in cuts):
        raise LCSurgeryError("exit points must be given in forward order")
    reach = set(data_nodes(graph))
    bounds = [next(n for n in graph.nodes if n.op == "placeholder"), *cuts]
    segments = []
    for k, start in enumerate(bounds):
        end = cuts[k] if k < len(cuts) else None
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        env[start] = g.node_copy(start) if start.op == "placeholder" else g.placeholder("x")

        def load(a: fx.Node) -> fx.Node:
            if a not in env:
                if a in reach:
                    raise LCSurgeryError(f"{a.name} is read across the exit point {start.name}: not a place where the network narrows to one map")
                env[a] = g.node_copy(a, load)  # a parameter or constant expression: recomputed here
            return env[a]

        for n in list(graph.nodes)[order[start] + 1 :]:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                g.node_copy(n, load)
                break
            if n in reach:
                env[n] = g.node_copy(n, load)
            if n is end:
                g.output(env[n])
                break
        g.lint()
        segments.append(g)
    return segments


def compile_segment(root: nn.Module, graph: fx.Graph) -> Callable[[nn.Module, Tensor], Tensor]:
    """A segment's forward as a function of (``root``, input): its code reads ``root``'s modules
    and parameters at call time, so weights loaded or moved later are the ones it runs."""
    return type(fx.GraphModule(root, graph)).forward
