"""``LCModel``: the converted model returned by ``lcsurgery.convert``.

It holds the user's module tree under the original names (so checkpoints keep loading), the
gates under ``lc_gates.<block>``, and a rewritten fx graph in which every residual region is
one call to its ``GatedBlock``. The graph's code runs with the LCModel as ``self``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import Tensor, fx, nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.fx.blocks import sanitize
from lcsurgery.surgery.block import PLACEMENTS, GatedBlock

GATE_PREFIX = "lc_gates"

_EXECUTIONS = ("skip", "masked")
_OWN_NAMES = {"placement", "execution", "lc_gates", "lc_config", "lc_source", "lc_graph_module", "lc_code", "lc_blocks"}


class LCModel(nn.Module):
    """A residual CNN with LC-Net gates; behaves like the original model plus gates."""

    def __init__(self, root: nn.Module, graph: fx.Graph, blocks: list[GatedBlock], config: dict[str, Any]) -> None:
        super().__init__()
        clash = sorted(_OWN_NAMES & (set(dict(root.named_children())) | set(vars(root))))
        if clash:
            raise LCSurgeryError(f"{type(root).__name__} has attributes named {clash}, which lcsurgery's converted model needs")
        for name, child in root.named_children():
            self.add_module(name, child)
        for name, param in root.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in root.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in root._non_persistent_buffers_set)
        for name, value in vars(root).items():
            if name.startswith("_tensor_constant") and isinstance(value, Tensor):
                self.register_buffer(name, value, persistent=False)  # constants fx lifted while tracing
            elif not name.startswith("_") and name != "training" and not isinstance(value, (nn.Module, Tensor)):
                object.__setattr__(self, name, value)  # plain attributes such as timm's pretrained_cfg
        self.lc_gates = nn.ModuleDict({sanitize(b.name): b for b in blocks})
        self.lc_config = dict(config)
        self.lc_source = type(root).__name__
        name = f"LC{type(root).__name__}"
        code = fx.GraphModule(self, graph, class_name=name)
        object.__setattr__(self, "lc_graph_module", code)
        for block in blocks:
            object.__setattr__(block, "root", self)
        self.register_forward_pre_hook(record_input_size)
        self.register_load_state_dict_post_hook(_drop_plans)
        # The generated forward runs with this model as ``self``; a per-instance subclass gives it
        # the graph's real signature, so the model can be traced or exported again.
        self.__class__ = type(name, (LCModel,), {"forward": type(code).forward, "__module__": __name__})

    @property
    def lc_code(self) -> str:
        """The rewritten forward, as Python source."""
        return self.lc_graph_module.code

    def lc_blocks(self) -> Iterator[GatedBlock]:
        """Gated blocks in forward order."""
        return iter(self.lc_gates.values())

    @property
    def placement(self) -> str:
        return self.lc_config["placement"]

    @placement.setter
    def placement(self, value: str) -> None:
        check_placement(value)
        self.lc_config["placement"] = value
        for b in self.lc_blocks():
            b.placement = value
            b.engine = None

    @property
    def execution(self) -> str:
        """``"skip"``: eval mode really skips gated-off work; ``"masked"``: compute all, multiply by gates."""
        return next(iter(self.lc_blocks())).execution

    @execution.setter
    def execution(self, value: str) -> None:
        if value not in _EXECUTIONS:
            raise ValueError(f"execution must be one of {_EXECUTIONS}, got {value!r}")
        for b in self.lc_blocks():
            b.execution = value

    def train(self, mode: bool = True) -> LCModel:
        super().train(mode)
        _drop_plans(self)  # weights may have changed while training: rebuild folded plans lazily
        return self

    def _apply(self, fn, recurse=True):  # .to()/.cuda()/.half(): folded plans hold old tensors
        _drop_plans(self)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"source={self.lc_source}, blocks={len(self.lc_gates)}, placement={self.placement}"


def _drop_plans(model: LCModel, *_: object) -> None:
    """Forget eval-time skipping plans (folded weights); they are rebuilt on the next eval forward."""
    for b in model.lc_blocks():
        b.engine = None


def record_input_size(model: LCModel, args: tuple) -> None:
    """Remember the input size of each forward, so its MACs can be read without another pass (a
    forward pre-hook; code that runs the model's blocks without its forward, as exit segments do, calls it)."""
    if args and isinstance(args[0], Tensor) and args[0].dim() == 4 and not isinstance(args[0], fx.Proxy):
        model.__dict__["lc_last_input_size"] = tuple(args[0].shape[1:])


def check_placement(placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be 'parallel' or 'sequential', got {placement!r}")


def unwrap(model: nn.Module) -> LCModel:
    """The LCModel inside ``model`` (a DDP or ``torch.compile`` wrapper is looked through)."""
    seen = model
    for attr in ("module", "_orig_mod"):
        while hasattr(seen, attr) and isinstance(getattr(seen, attr), nn.Module) and not isinstance(seen, LCModel):
            seen = getattr(seen, attr)
    if not isinstance(seen, LCModel):
        raise LCSurgeryError(
            f"expected a model converted by lcsurgery.convert(), got {type(model).__name__}; "
            "call lc = lcsurgery.convert(model) first"
        )
    return seen

