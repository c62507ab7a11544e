"""The outside static baseline: Torch-Pruning (Fang et al., DepGraph, CVPR 2023) at a MAC budget.

The channels pruned are those LC-Net's C-Nets gate: the output channels of each residual
block's first conv (with its norm and the next conv's inputs, which Torch-Pruning's dependency
graph follows), found by ``lcsurgery.find_blocks``. Everything else is left alone, so no
shortcut has to be followed (the CIFAR ResNets' parameter-free zero-padding shortcut cannot be).
Importance is Torch-Pruning's L2 magnitude, the ratio the same in every block, removed in
``STEPS`` iterative steps; the ratio is found by bisection so that the pruned network's MACs
(fvcore, conv and linear layers) meet the budget. Install with ``pip install "lcsurgery[compare]"``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.static import fvcore_macs
from lcsurgery.surgery.convert import find_blocks

STEPS = 5


def _tp():
    try:
        import torch_pruning
    except ImportError as exc:
        raise LCSurgeryError(
            "the Torch-Pruning baseline needs the torch-pruning package: pip install \"lcsurgery[compare]\" "
            "(or pip install 'torch-pruning>=1.6,<1.7')"
        ) from exc
    return torch_pruning


def block_convs(model: nn.Module, input_size: tuple[int, int, int]) -> list[str]:
    """Names of the convs whose output channels LC-Net would gate: each residual block's first conv."""
    return [b.first_conv for b in find_blocks(model, input_size=input_size) if b.first_conv]


def prune(model: nn.Module, ratio: float, input_size: tuple[int, int, int]) -> dict[str, int]:
    """Prune ``ratio`` of each block's first-conv channels in place (L2 magnitude, iterative); returns
    the channels each of those convs keeps."""
    tp = _tp()
    targets = block_convs(model, input_size)
    modules = dict(model.named_modules())
    keep = {modules[n] for n in targets}
    ignored = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m not in keep]
    example = torch.zeros(1, *input_size)
    pruner = tp.pruner.MagnitudePruner(
        model, example, importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=ratio, iterative_steps=STEPS, ignored_layers=ignored,
    )  # fmt: skip
    for _ in range(STEPS):
        pruner.step()
    return {n: modules[n].out_channels for n in targets}


def prune_to_budget(model: nn.Module, budget: float, input_size: tuple[int, int, int], *, tolerance: float = 0.005) -> tuple[nn.Module, dict[str, int]]:
    """A pruned copy of ``model`` whose MACs are within ``tolerance`` (relative) of ``budget`` x the
    original's where the channel counts allow, and the channels each pruned conv keeps."""
    dense = fvcore_macs(model.eval(), (torch.zeros(1, *input_size),))
    lo, hi = 0.0, 1.0
    best = None
    for _ in range(20):
        ratio = (lo + hi) / 2
        trial = copy.deepcopy(model)
        structure = prune(trial, ratio, input_size)
        fraction = fvcore_macs(trial.eval(), (torch.zeros(1, *input_size),)) / dense
        if best is None or abs(fraction - budget) < abs(best[2] - budget):
            best = (trial, structure, fraction)
        if abs(fraction - budget) <= tolerance * budget:
            break
        lo, hi = (ratio, hi) if fraction > budget else (lo, ratio)
    return best[0], best[1]


def apply_structure(model: nn.Module, structure: dict[str, int], input_size: tuple[int, int, int]) -> nn.Module:
    """Cut ``model`` (in place) to the channel counts of a pruned run, so its saved weights load."""
    tp = _tp()
    graph = tp.DependencyGraph().build_dependency(model, torch.zeros(1, *input_size))
    modules = dict(model.named_modules())
    for name, channels in structure.items():
        conv = modules.get(name)
        if conv is None or conv.out_channels < channels:
            raise LCSurgeryError(f"cannot rebuild the pruned model: {name} has {getattr(conv, 'out_channels', 'no')} channels, the run kept {channels}")
        drop = list(range(channels, conv.out_channels))
        if drop:
            graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=drop).prune()
    return model
