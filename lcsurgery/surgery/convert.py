"""The public surgery: ``convert`` a residual CNN, ``find_blocks`` as a dry run, ``gated_blocks``."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lcsurgery.errors import LCSurgeryError, NoResidualBlocksError
from lcsurgery.fx.blocks import BlockOptions, BlockSpec, Rejected, find_residual_blocks, sanitize
from lcsurgery.fx.graph import data_nodes
from lcsurgery.fx.outline import outline
from lcsurgery.fx.tracer import trace, training_mode
from lcsurgery.layers.relu1 import MODES
from lcsurgery.surgery.block import BlockInfo, GatedBlock, static_kinds
from lcsurgery.surgery.model import GATE_PREFIX, LCModel, check_placement, unwrap

DEFAULT_SLOPE = 0.05


class BlockList(list):
    """``find_blocks`` result: a list of ``BlockInfo`` that prints as a table, plus ``rejected``."""

    def __init__(self, infos: list[BlockInfo], rejected: list[Rejected], model_name: str) -> None:
        super().__init__(infos)
        self.rejected = rejected
        self.model_name = model_name

    def __str__(self) -> str:
        head = ("block", "in", "gated", "gates", "first conv", "next conv", "note")
        rows = [(b.name, str(b.in_channels), str(b.gated_channels), b.gates, b.first_conv or "-", b.next_conv or "-", b.note) for b in self]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [f"{self.model_name}: {len(self)} residual blocks to gate", fmt.format(*head)]
        lines += [fmt.format(*r).rstrip() for r in rows]
        lines += [f"not gated: {r.name}: {r.reason}" for r in self.rejected]
        return "\n".join(lines)

    __repr__ = __str__


def convert(
    model: nn.Module,
    placement: str = "parallel",
    *,
    layers: bool = True,
    channels: bool = True,
    exclude: Sequence[str] = (),
    slope: float = DEFAULT_SLOPE,
    relu1_mode: str = "straight_through",
    leaf_modules: Sequence[str | type] = (),
    input_size: tuple[int, int, int] | None = None,
    static: bool | str = False,
) -> LCModel:
    """Return a copy of ``model`` with LC-Net gates on every residual block; ``model`` is untouched.

    Args:
        placement: ``"parallel"`` (gates beside the first conv) or ``"sequential"`` (gates first,
            so the first conv's filters are trimmed too). Same function, different schedule.
        layers / channels: add the L-Net (block skipping) / the C-Net (channel skipping).
        exclude: block names or shell patterns (``"layer4.*"``) to leave ungated.
        slope: slope of the ReLU-1 gradient outside [0, 1] during training.
        relu1_mode: ``"straight_through"`` (training forward is the hard clamp, as in eval; only
            the gradient leaks) or ``"leaky"`` (the forward value leaks too, as in the paper).
        leaf_modules: module paths or classes that tracing must not enter.
        input_size: (C, H, W) of an example input used to read channel counts.
        static: gates that ignore the input (a learned bias each): fine-tuned, they learn one
            mask of blocks and channels for every image, the static-pruning baseline against
            which per-input gating is measured. ``"layers"`` or ``"channels"`` makes only that
            kind static (one channel mask for all, say, while layer gates still read the image).

    At initialisation every gate is 1, so in eval mode the result computes what ``model`` does.
    """
    check_placement(placement)
    static_layer, static_channels = static_kinds(static)
    if (static_layer and not layers) or (static_channels and not channels):
        raise ValueError(f"static={static!r} makes gates static that this conversion does not add (layers={layers}, channels={channels})")
    if not 0.0 <= slope < 1.0:
        raise ValueError(f"slope must be in [0, 1), got {slope}")
    if relu1_mode not in MODES:
        raise ValueError(f"relu1_mode must be one of {MODES}, got {relu1_mode!r}")
    _refuse_converted(model)
    root = copy.deepcopy(model)
    input_size = resolve_input_size(root, input_size)
    graph, specs, rejected = _analyse(root, leaf_modules, input_size, BlockOptions(layers, channels, tuple(exclude)))
    if not specs:
        raise _no_blocks_error(model, rejected)
    blocks = [_make_block(spec, root, slope, placement, relu1_mode, static) for spec in specs]
    config = dict(
        placement=placement, layers=layers, channels=channels, exclude=list(exclude), slope=slope, relu1_mode=relu1_mode, input_size=input_size, static=static,
        leaf_modules=[m if isinstance(m, str) else m.__qualname__ for m in leaf_modules],
    )  # fmt: skip
    lc = LCModel(root, _rewrite(graph, specs), blocks, config)
    lc.train(model.training)
    return lc


def find_blocks(
    model: nn.Module,
    *,
    layers: bool = True,
    channels: bool = True,
    exclude: Sequence[str] = (),
    leaf_modules: Sequence[str | type] = (),
    input_size: tuple[int, int, int] | None = None,
) -> BlockList:
    """Dry run of ``convert``: each block that would be gated, in forward order, and why others are not."""
    _refuse_converted(model)
    root = copy.deepcopy(model)
    _, specs, rejected = _analyse(root, leaf_modules, input_size, BlockOptions(layers, channels, tuple(exclude)))
    return BlockList([_info(s, root) for s in specs], rejected, type(model).__name__)


def gated_blocks(model: nn.Module) -> list[GatedBlock]:
    """The gated blocks of a converted model in forward order (each has ``name``, ``l_net``, ``c_net``)."""
    return list(unwrap(model).lc_blocks())


def _refuse_converted(model: nn.Module) -> None:
    if isinstance(model, LCModel) or any(isinstance(m, GatedBlock) for m in model.modules()):
        raise LCSurgeryError(
            f"{type(model).__name__} is already converted by lcsurgery (it has {GATE_PREFIX}); "
            "convert the original model instead, or use lcsurgery.gated_blocks() to inspect this one"
        )


def _analyse(
    root: nn.Module, leaf_modules: Sequence[str | type], input_size: tuple[int, int, int] | None, options: BlockOptions
) -> tuple[fx.Graph, list[BlockSpec], list[Rejected]]:
    graph = trace_with_shapes(root, leaf_modules, resolve_input_size(root, input_size))
    specs, rejected = find_residual_blocks(graph, root, options)
    return graph, specs, rejected


def trace_with_shapes(root: nn.Module, leaf_modules: Sequence[str | type], input_size: tuple[int, int, int], graph: fx.Graph | None = None) -> fx.Graph:
    """``root``'s fx graph (traced, or ``graph`` as given) with every node's shape recorded from one
    example input in eval mode; a model that fails on that input is refused with its own error
    and what to pass instead."""
    if graph is None:
        graph, _ = trace(root, leaf_modules)
    example = torch.randn(1, *input_size, **tensor_kwargs(root))
    try:
        with training_mode(root, False), torch.no_grad():
            ShapeProp(fx.GraphModule(root, graph)).propagate(example)
    except Exception as exc:  # any failure of the user's model on the example input
        raise LCSurgeryError(
            f"running {type(root).__name__} on an example input of shape {tuple(example.shape)} failed "
            f"({type(exc).__name__}: {exc}); pass input_size=(C, H, W) that the model accepts"
        ) from exc
    return graph


def resolve_input_size(model: nn.Module, input_size: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """``input_size`` checked, else the model's own (``default_input_size``, timm's ``pretrained_cfg``), else 224 x 224."""
    if input_size is not None:
        if len(input_size) != 3:
            raise ValueError(f"input_size must be (C, H, W), got {input_size}")
        return tuple(input_size)
    size = getattr(model, "default_input_size", None)
    cfg = getattr(model, "pretrained_cfg", None)
    if size is None and isinstance(cfg, dict) and cfg.get("input_size"):
        size = tuple(cfg["input_size"])
    if size is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        size = (first.in_channels if first is not None else 3, 224, 224)
    return tuple(size)


def tensor_kwargs(model: nn.Module) -> dict:
    """Device and dtype of the model's parameters, for tensors made to run through it."""
    p = next(model.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _no_blocks_error(model: nn.Module, rejected: list[Rejected]) -> NoResidualBlocksError:
    detail = "".join(f"\n  {r.name}: {r.reason}" for r in rejected)
    return NoResidualBlocksError(
        f"{type(model).__name__} has no residual block to gate: lcsurgery looks for joins "
        f"add(branch(x), shortcut(x)) whose branch runs a conv, and found "
        f"{'none' if not rejected else str(len(rejected)) + ' it cannot gate:'}{detail}"
    )


def _info(spec: BlockSpec, root: nn.Module) -> BlockInfo:
    c = spec.channel
    gates = "+".join(g for g, on in (("layer", spec.layer_gate), ("channel", c is not None)) if on)
    return BlockInfo(
        name=spec.name,
        in_channels=spec.in_channels,
        gated_channels=c.channels if c else 0,
        first_conv=c.first.target if c else None,
        next_conv=c.next.target if c else None,
        gates=gates,
        note="; ".join(spec.notes),
    )


def _make_block(spec: BlockSpec, root: nn.Module, slope: float, placement: str, relu1_mode: str, static: bool | str) -> GatedBlock:
    key = sanitize(spec.name)
    pieces = {"shortcut": outline(spec.shortcut, spec.input, spec.shortcut_out, root, f"{key}_shortcut")}
    c = spec.channel
    if c is None:
        pieces["branch"] = outline(spec.branch, spec.input, spec.branch_out, root, f"{key}_branch")
    else:
        first_in, next_in = c.first.args[0], c.next.args[0]
        pieces.update(
            pre=outline(spec.pre, spec.input, first_in, root, f"{key}_pre"),
            first=outline([c.first], first_in, c.first, root, f"{key}_first"),
            mid=outline(spec.mid, c.first, c.gate_point, root, f"{key}_mid"),
            between=outline(spec.between, c.gate_point, next_in, root, f"{key}_between"),
            next=outline([c.next], next_in, c.next, root, f"{key}_next"),
            post=outline(spec.post, c.next, spec.branch_out, root, f"{key}_post"),
        )
    channel_dim = c.channel_dim if c else 1
    block = GatedBlock(_info(spec, root), pieces, channel_dim, slope, placement, relu1_mode, static=static)
    p = next(root.parameters(), None)
    return block.to(p.device, p.dtype) if p is not None else block


def _rewrite(graph: fx.Graph, specs: list[BlockSpec]) -> fx.Graph:
    """The model graph with each residual region replaced by one call to its gated block."""
    by_join = {s.join: s for s in specs}
    inside = {n for s in specs for n in s.branch + s.shortcut}
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in inside:
            continue
        spec = by_join.get(node)
        if spec is None:
            env[node] = new.node_copy(node, lambda a: env[a])
        else:
            env[node] = new.call_module(f"{GATE_PREFIX}.{sanitize(spec.name)}", (env[spec.input],))
            env[node].meta = dict(node.meta)
    reach = set(data_nodes(new))
    for node in reversed(list(new.nodes)):  # parameter-only expressions now used inside blocks only
        if not node.users and node not in reach and node.op in ("get_attr", "call_function", "call_method"):
            new.erase_node(node)
    new.lint()
    return new
