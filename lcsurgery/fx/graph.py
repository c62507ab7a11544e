"""Graph analysis on fx graphs: data-flow reachability, dominators and single-entry regions.

A residual block is a single-entry, single-exit region: its input (the fork point) dominates
the join, and nothing inside it is read from outside. Dominators make that precise for any
wiring a user may write, without pattern-matching module names.
"""

from __future__ import annotations

from torch import fx


def data_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Nodes computed from the graph inputs, in topological order (parameters and constants excluded)."""
    reach: set[fx.Node] = set()
    ordered: list[fx.Node] = []
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in reach for a in node.all_input_nodes):
            if node.op != "output":
                reach.add(node)
                ordered.append(node)
    return ordered


def data_inputs(node: fx.Node, reach: set[fx.Node]) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a in reach]


def immediate_dominators(nodes: list[fx.Node]) -> dict[fx.Node, fx.Node | None]:
    """Immediate dominator of every node of a DAG given in topological order.

    A virtual root (None) precedes all placeholders. One pass suffices on a DAG: a node's
    dominator is the nearest common dominator of its predecessors.
    """
    reach = set(nodes)
    idom: dict[fx.Node, fx.Node | None] = {}
    depth: dict[fx.Node | None, int] = {None: 0}

    def common(a: fx.Node | None, b: fx.Node | None) -> fx.Node | None:
        while a is not b:
            if depth[a] >= depth[b]:
                a = idom[a]  # type: ignore[index]
            else:
                b = idom[b]  # type: ignore[index]
        return a

    for node in nodes:
        preds = data_inputs(node, reach)
        dom: fx.Node | None = preds[0] if preds else None
        for p in preds[1:]:
            dom = common(dom, p)
        idom[node] = dom
        depth[node] = depth[dom] + 1
    return idom


def dominator_chain(target: fx.Node, start: fx.Node, idom: dict[fx.Node, fx.Node | None]) -> list[fx.Node]:
    """Nodes every path from ``start`` to ``target`` passes through, in order, ``start`` excluded."""
    chain = []
    node: fx.Node | None = target
    while node is not None and node is not start:
        chain.append(node)
        node = idom[node]
    if node is not start:
        raise ValueError(f"{start} does not dominate {target}")
    return chain[::-1]


def ancestors_within(node: fx.Node, stop: fx.Node, reach: set[fx.Node]) -> set[fx.Node]:
    """Data ancestors of ``node`` (inclusive) found walking backwards without passing ``stop``."""
    seen: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n is stop or n in seen:
            continue
        seen.add(n)
        todo.extend(data_inputs(n, reach))
    return seen


def escaping_node(region: set[fx.Node], exits: set[fx.Node]) -> fx.Node | None:
    """A node of ``region`` (not an exit) whose value is read outside ``region``; None if closed."""
    for n in region - exits:
        for user in n.users:
            if user not in region:
                return n
    return None


def topo_sorted(nodes: set[fx.Node], graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n in nodes]
