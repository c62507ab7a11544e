"""What each image computes in a gated network with exits: its own gates' decisions, up to the
exit it leaves at. An image that leaves early computes none of the later gates, so the gate
statistics of ``count_macs`` (distinct patterns, conditional gates, the per-class channel map)
are counted here over what ran: the question "does the computation depend on the image?" asked
of gates and exits together.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.report import GateUsage
from lcsurgery.surgery.model import LCModel


@dataclass
class GateDecisions:
    """Every gate's hard decision per image with the whole network run (no exit taken): per block,
    whether its layer gate kept it (blocks with an L-Net) and which channels were on where it ran
    (blocks with a C-Net, already false where the block was skipped)."""

    layer: dict[str, Tensor]  # block -> bool [N]
    channel: dict[str, Tensor]  # block -> bool [N, C]

    def __len__(self) -> int:
        first = next(iter(self.layer.values()), None)
        if first is None:
            first = next(iter(self.channel.values()), None)
        return 0 if first is None else len(first)

    @staticmethod
    def read(backbone: LCModel) -> GateDecisions:
        """The decisions of ``backbone``'s latest forward (every block run on the whole batch)."""
        layer, channel = {}, {}
        for b in backbone.lc_blocks():
            keep = b.last.keep().cpu()
            if b.l_net is not None:
                layer[b.name] = keep
            active = b.last.active()
            if active is not None:
                channel[b.name] = active.cpu() & keep[:, None]
        return GateDecisions(layer, channel)

    @staticmethod
    def cat(parts: list[GateDecisions]) -> GateDecisions:
        """The decisions of consecutive batches as one."""
        return GateDecisions({n: torch.cat([p.layer[n] for p in parts]) for n in parts[0].layer}, {n: torch.cat([p.channel[n] for p in parts]) for n in parts[0].channel})


def computed(decisions: GateDecisions, segments: dict[str, int], exit_of: Tensor) -> GateDecisions:
    """``decisions`` where each image stops at its exit: a block in a segment after the image's
    exit (``segments``: ``ExitModel.block_segments``) is neither kept nor has a channel on."""
    if len(exit_of) != len(decisions):
        raise LCSurgeryError(f"{len(exit_of)} exits for {len(decisions)} images' gate decisions")
    missing = sorted((set(decisions.layer) | set(decisions.channel)) - set(segments))
    if missing:
        raise LCSurgeryError(f"blocks {missing} are in no segment of the network with exits")
    exit_of = exit_of.cpu()

    def ran(name: str) -> Tensor:
        return exit_of >= segments[name]

    return GateDecisions({n: k & ran(n) for n, k in decisions.layer.items()}, {n: m & ran(n)[:, None] for n, m in decisions.channel.items()})


def usage(decisions: GateDecisions, exit_of: Tensor | None = None) -> GateUsage:
    """How often each gate was on and each image's pattern (an exact id: equal for two images
    exactly when they take the same gates and, given ``exit_of``, leave at the same exit)."""
    columns = [*(k[:, None] for k in decisions.layer.values()), *decisions.channel.values()]
    if exit_of is not None:
        columns.append(exit_of.cpu().long()[:, None])
    if not columns:
        raise LCSurgeryError("no gate decisions to count: the network has no gates")
    whole = torch.cat([c.long() for c in columns], 1)
    patterns = torch.unique(whole, dim=0, return_inverse=True)[1]
    return GateUsage(
        len(whole), {n: int(k.sum()) for n, k in decisions.layer.items()}, {n: m.long().sum(0) for n, m in decisions.channel.items()}, patterns,
    )  # fmt: skip
