"""Leaf-aware symbolic tracing that keeps train/eval behaviour intact.

A plain ``torch.fx.symbolic_trace`` inlines Python control flow with the values it had at
trace time. Modules that branch on ``self.training`` (timm's DropPath, BatchNormAct2d,
torchvision's StochasticDepth, user code calling ``F.dropout(x, training=self.training)``)
would then have one mode baked into the graph. We keep such modules as leaves: the known
ones up front, and any other by tracing in both modes and leafing the modules whose graphs
differ. Failures name the module being traced and fx's reason, and suggest ``leaf_modules``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn

from lcsurgery.errors import TraceError

_DEFAULT_LEAF_TYPES: tuple[type, ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.dropout._DropoutNd,
)


def _optional_leaf_types() -> tuple[type, ...]:
    """Leaf types from torchvision and timm, when those packages are installed."""
    types: list[type] = []
    try:
        from torchvision.ops import StochasticDepth
        from torchvision.ops.misc import FrozenBatchNorm2d

        types += [StochasticDepth, FrozenBatchNorm2d]
    except ImportError:  # torchvision is optional for tracing
        pass
    try:
        import timm.layers as tl

        types += [tl.DropPath, tl.DropBlock2d, *tl.get_notrace_modules()]
    except ImportError:  # timm is optional for tracing
        pass
    return tuple(types)


def _optional_autowrap_functions() -> tuple[Any, ...]:
    try:
        import timm.layers as tl

        return tuple(tl.get_notrace_functions())
    except ImportError:  # timm is optional for tracing
        return ()


class LeafTracer(fx.Tracer):
    """An fx tracer with extra leaf modules and a record of which module was being traced."""

    def __init__(self, leaf_types: Sequence[type] = (), leaf_names: Iterable[str] = ()) -> None:
        super().__init__(autowrap_functions=_optional_autowrap_functions())
        self.leaf_types = tuple(_DEFAULT_LEAF_TYPES) + _optional_leaf_types() + tuple(leaf_types)
        self.leaf_names = set(leaf_names)
        self._stack: list[str] = []
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        self._stack.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


@contextlib.contextmanager
def training_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Temporarily put every submodule in one mode, restoring each one's own flag after."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _trace_once(model: nn.Module, leaf_types: Sequence[type], leaf_names: set[str]) -> fx.Graph:
    tracer = LeafTracer(leaf_types, leaf_names)
    try:
        return tracer.trace(model)
    except Exception as exc:  # fx raises many types; re-raise one clear error
        where = tracer.failed_in or "<top-level forward>"
        kind = type(model).__name__ if where == "<top-level forward>" else type(model.get_submodule(where)).__name__
        hint = (
            f"pass leaf_modules=[{where!r}] (or its class) so lcsurgery treats it as an opaque layer"
            if tracer.failed_in
            else "the model's own forward() must be traceable by torch.fx"
        )
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}: it failed inside module {where!r} ({kind}) with "
            f"{type(exc).__name__}: {exc}. To fix, {hint}."
        ) from exc


def _entry(node: fx.Node, flags_as: str | None) -> str:
    """A node as text; with ``flags_as`` set, boolean constants are written as that marker."""

    def arg_repr(a: Any) -> str:
        a = fx.node.map_arg(a, lambda n: "%")
        if flags_as is not None:
            a = torch.utils._pytree.tree_map(lambda v: flags_as if isinstance(v, bool) else v, a)
        return repr(a)

    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"{node.op}:{target}:{arg_repr(node.args)}:{arg_repr(node.kwargs)}"


def _signature(graph: fx.Graph, flags_as: str | None) -> dict[str, list[str]]:
    """Per module path (``""`` for the whole model), the ops its forward recorded."""
    sig: dict[str, list[str]] = {"": []}
    for node in graph.nodes:
        entry = _entry(node, flags_as)
        sig[""].append(entry)
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            sig.setdefault(path, []).append(entry)
    return sig


def _is_ancestor(p: str, q: str) -> bool:
    return p != q and (p == "" or q.startswith(p + "."))


def _structurally_different_modules(train_graph: fx.Graph, eval_graph: fx.Graph) -> set[str]:
    """The deepest module paths whose traced code differs between modes beyond boolean flags."""
    a, b = _signature(train_graph, "<flag>"), _signature(eval_graph, "<flag>")
    differing = {p for p in set(a) | set(b) if a.get(p) != b.get(p)}
    return {p for p in differing if not any(_is_ancestor(p, q) for q in differing)}


def _wire_training_flags(train_graph: fx.Graph, eval_graph: fx.Graph) -> bool:
    """Where the two graphs differ only in ``True``/``False`` constants (``training=self.training``),
    make ``train_graph`` read the calling module's live ``training`` flag instead. False if they
    differ otherwise."""
    nodes_t, nodes_e = list(train_graph.nodes), list(eval_graph.nodes)
    edits: list[tuple[fx.Node, list[tuple[str, Any]]]] = []
    for nt, ne in zip(nodes_t, nodes_e, strict=True):
        if _entry(nt, None) == _entry(ne, None):
            continue
        diffs = [(k, v) for k, v in list(enumerate(nt.args)) + list(nt.kwargs.items()) if _masked(_arg(ne, k)) != _masked(v)]
        if not all(v is True and _arg(ne, k) is False for k, v in diffs):
            return False
        edits.append((nt, diffs))
    for node, diffs in edits:
        path = module_path(node)
        with train_graph.inserting_before(node):
            flag = train_graph.get_attr(f"{path}.training" if path else "training")
        args, kwargs = list(node.args), dict(node.kwargs)
        for k, _ in diffs:
            if isinstance(k, int):
                args[k] = flag
            else:
                kwargs[k] = flag
        node.args, node.kwargs = tuple(args), kwargs
    return True


def _masked(a: Any) -> str:
    return repr(fx.node.map_arg(a, lambda n: "%"))


def _arg(node: fx.Node, key: int | str) -> Any:
    if isinstance(key, int):
        return node.args[key] if key < len(node.args) else None
    return node.kwargs.get(key)


def trace(
    model: nn.Module, leaf_modules: Sequence[str | type] = (), max_rounds: int = 8
) -> tuple[fx.Graph, set[str]]:
    """Trace ``model`` so that the graph behaves like the model in both train and eval mode.

    Calls that only pass ``training=self.training`` read the module's flag at run time; modules
    whose code otherwise depends on the mode become leaves. Returns the graph and the set of
    module paths made leaves that way.
    """
    leaf_types = [m for m in leaf_modules if isinstance(m, type)]
    leaf_names = {m for m in leaf_modules if isinstance(m, str)}
    unknown = [n for n in leaf_names if n and not _has_submodule(model, n)]
    if unknown:
        raise TraceError(f"leaf_modules names {unknown} that are not submodules of {type(model).__name__}")
    auto: set[str] = set()
    for _ in range(max_rounds):
        with training_mode(model, True):
            g_train = _trace_once(model, leaf_types, leaf_names | auto)
        with training_mode(model, False):
            g_eval = _trace_once(model, leaf_types, leaf_names | auto)
        new = _structurally_different_modules(g_train, g_eval) - auto
        if not new and _wire_training_flags(g_train, g_eval):
            return g_train, auto
        if "" in new or not new:
            raise TraceError(
                f"{type(model).__name__}.forward itself branches on self.training, so one fx graph cannot "
                "reproduce both modes; move the mode-dependent part into a submodule and pass it as leaf_modules"
            )
        auto |= new
    raise TraceError(f"could not separate train/eval behaviour of {type(model).__name__} in {max_rounds} rounds")


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def module_path(node: fx.Node) -> str:
    """The deepest module whose forward produced ``node`` ('' for the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return path

