"""Outline a run of graph nodes into its own callable piece.

Each piece is a small ``GraphModule`` whose code refers to the original module paths
(``layer1.0.conv1``...). Pieces are called with the converted model as ``self``, so they always
use the model's current submodules, and no parameter is registered twice.
"""

from __future__ import annotations

from torch import Tensor, fx, nn

from lcsurgery.errors import LCSurgeryError


class Piece:
    """A single-input, single-output slice of the traced graph."""

    def __init__(self, nodes: list[fx.Node], inp: fx.Node, out: fx.Node, root: nn.Module, name: str) -> None:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {inp: graph.placeholder("x")}

        def load(a: fx.Node) -> fx.Node:
            """Inputs from outside the region may only be parameters or values computed from them."""
            if a not in env:
                if a.op == "placeholder":
                    raise LCSurgeryError(f"internal error: piece {name} reads {a.name} from outside its region")
                env[a] = graph.node_copy(a, load)
            return env[a]

        for n in nodes:
            env[n] = graph.node_copy(n, load)
        graph.output(env[out])
        self.name = name
        self.nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
        self.module = fx.GraphModule(root, graph, class_name=name)
        self._forward = type(self.module).forward

    def __call__(self, root: nn.Module, x: Tensor) -> Tensor:
        return self._forward(root, x)

    @property
    def graph(self) -> fx.Graph:
        return self.module.graph

    def module_targets(self) -> list[str]:
        """Paths of the modules this piece calls, in order."""
        return [n.target for n in self.nodes if n.op == "call_module"]

    def __repr__(self) -> str:
        return f"Piece({self.name}: {', '.join(n.name for n in self.nodes)})"


def outline(nodes: list[fx.Node], inp: fx.Node, out: fx.Node, root: nn.Module, name: str) -> Piece | None:
    """The piece computing ``out`` from ``inp`` through ``nodes`` (None when it is the identity)."""
    if not nodes:
        return None
    return Piece(nodes, inp, out, root, name)
