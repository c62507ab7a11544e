"""``MacReport``: dense vs dynamic MACs per image, per block, with a readable summary table,
and how it is built from hard gate decisions and the static costs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lcsurgery.macs.static import StaticCosts
from lcsurgery.surgery.model import check_placement


def format_macs(n: float) -> str:
    """MACs with a unit a person reads at a glance: 40.55M, 4.09G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


@dataclass(frozen=True)
class BlockMacs:
    """One gated block over the counted images."""

    name: str
    dense: int  # MACs of the block in the original model (branch + shortcut)
    gate: int  # MACs of its gates (pooling + L-Net + C-Net)
    mean: float  # mean MACs per image under the placement, gate and shortcut included
    skip_rate: float  # fraction of images for which the L-Net skips the block
    active_fraction: float  # mean fraction of gated channels active where the block runs (nan: no C-Net or never run)


CONDITIONAL = (0.05, 0.95)  # a gate is conditional when it is on for more than 5% and less than 95% of the images


@dataclass
class GateUsage:
    """How the gates decided over the counted images: how often each gate was on, and each image's pattern.

    A layer gate is on where its block runs; a channel gate where its block runs and the channel
    is active. ``patterns`` identifies each image's whole on/off vector, so two images share a value
    exactly when they take the same gates (``count_macs`` keeps a 64-bit fingerprint, so no per-image
    mask is kept: collisions aside, one in 2^64).
    """

    images: int
    layer_on: dict[str, int]  # block -> images for which its L-gate was on (blocks with an L-gate)
    channel_on: dict[str, Tensor]  # block -> int64 [C]: images for which each channel gate was on
    patterns: Tensor  # int64 [N]

    def rates(self) -> dict[str, Tensor]:
        """Per block, the share of images for which each of its gates was on (L-gate first)."""
        out = {}
        for name in dict.fromkeys([*self.layer_on, *self.channel_on]):
            parts = []
            if name in self.layer_on:
                parts.append(torch.tensor([self.layer_on[name]], dtype=torch.float64))
            if name in self.channel_on:
                parts.append(self.channel_on[name].double())
            out[name] = torch.cat(parts) / max(self.images, 1)
        return out

    def conditional_share(self, rates: Tensor) -> float:
        lo, hi = CONDITIONAL
        return float(((rates > lo) & (rates < hi)).double().mean()) if rates.numel() else 0.0


def dynamics(per_sample: Tensor, dense: int, usage: GateUsage | None = None) -> dict:
    """How much the computation depends on the image: per-image MAC statistics (as fractions of
    ``dense``) and, given the gates' ``usage``, distinct gate patterns and the share of conditional
    gates, overall and per block."""
    q = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    frac = per_sample.double() / dense
    p10, p50, p90 = torch.quantile(frac, q).tolist()
    out = {
        "images": len(frac),
        "mac_fraction": {
            "mean": float(frac.mean()), "std": float(frac.std(unbiased=False)), "p10": p10, "p50": p50, "p90": p90,
            "min": float(frac.min()), "max": float(frac.max()), "p90_over_p10": p90 / p10 if p10 > 0 else None,
        },
    }  # fmt: skip
    if usage is not None:
        rates = usage.rates()
        every = torch.cat(list(rates.values())) if rates else torch.zeros(0)
        out["distinct_patterns"] = int(torch.unique(usage.patterns).numel())
        out["conditional_gates"] = usage.conditional_share(every)
        out["conditional_by_block"] = {n: usage.conditional_share(r) for n, r in rates.items()}
    return out


@dataclass
class MacReport:
    """MACs each image needs under a converted model's gates, counted exactly.

    ``per_sample`` equals fvcore's count of the dense network physically sliced for that image
    (skipped blocks removed, gated convs cut to the active channels), gates included.
    """

    per_sample: Tensor  # int64 [N]
    dense: int  # MACs per image of the original dense model
    open: int  # MACs per image of the converted model with every gate open
    placement: str
    counting: str
    input_size: tuple[int, int, int]
    by_block: dict[str, BlockMacs]
    keep: Tensor  # bool [N, blocks]: block runs for that image
    active: Tensor  # int [N, blocks]: active gated channels (0 for blocks without C-Net)
    labels: Tensor | None = None  # [N] when the counted data carried labels
    predictions: Tensor | None = None  # [N] argmax of the model's output, for classifiers
    masks: dict[str, Tensor] | None = field(default=None, repr=False)  # name -> bool [N, C], if asked for
    costs: StaticCosts | None = field(default=None, repr=False)  # the static costs behind the numbers
    usage: GateUsage | None = field(default=None, repr=False)  # how often each gate was on, each image's pattern

    def dynamics(self) -> dict:
        """How much the computation depends on the image (``dynamics``)."""
        return dynamics(self.per_sample, self.dense, self.usage)

    @property
    def accuracy(self) -> float | None:
        """Top-1 accuracy where labels and class predictions were seen (None otherwise)."""
        if self.labels is None or self.predictions is None:
            return None
        return float((self.predictions == self.labels).double().mean())

    @property
    def mean(self) -> float:
        """Mean MACs per image."""
        return float(self.per_sample.double().mean())

    @property
    def ratio(self) -> float:
        """Mean dynamic MACs as a fraction of the dense model's."""
        return self.mean / self.dense

    def with_placement(self, placement: str) -> MacReport:
        """The same images and gate decisions accounted under the other schedule (no new forward)."""
        return build_report(self.costs, self.keep, self.active, placement, self.labels, self.predictions, self.masks, self.usage)

    def summary(self) -> str:
        """A table a person can read: dense vs dynamic MACs, ratio, per-block skip rates."""
        convention = "conv+fc MACs" if self.counting == "conv_fc" else "fvcore MACs (norms and pooling included)"
        q = torch.quantile(self.per_sample.double(), torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)).tolist()
        lines = [
            f"MACs per image ({convention}), {self.placement} placement, {len(self.per_sample)} images at {'x'.join(map(str, self.input_size))}",
            f"  dense model        {format_macs(self.dense):>9}",
            f"  gates all open     {format_macs(self.open):>9}  (gates cost {format_macs(self.open - self.dense)})",
            f"  LC-Net, dynamic    {format_macs(self.mean):>9}  = {self.ratio:.3f} x dense  ({self.dense / self.mean:.2f}x fewer)",
            f"  min/median/max     {' / '.join(format_macs(v) for v in q)}",
        ]
        dyn = self.dynamics()
        m = dyn["mac_fraction"]
        spread = f"p90/p10 = {m['p90_over_p10']:.2f}" if m["p90_over_p10"] else "p10 is 0"
        lines.append(f"  per image          p10 {m['p10']:.3f} / p50 {m['p50']:.3f} / p90 {m['p90']:.3f} of dense ({spread})")
        if "distinct_patterns" in dyn:
            lines.append(f"  distinct gate patterns {dyn['distinct_patterns']} of {dyn['images']} images; conditional gates (on for 5-95% of images) {100 * dyn['conditional_gates']:.1f}%")
        if self.accuracy is not None:
            lines.append(f"  top-1 accuracy     {100 * self.accuracy:8.2f}%")
        lines.append("")
        head = ("block", "dense", "mean", "skip rate", "active ch.", "conditional")
        cond = dyn.get("conditional_by_block", {})
        rows = [
            (
                b.name, format_macs(b.dense), format_macs(b.mean), f"{100 * b.skip_rate:.1f}%", "-" if math.isnan(b.active_fraction) else f"{100 * b.active_fraction:.1f}%",
                f"{100 * cond[b.name]:.0f}%" if b.name in cond else "-",
            )  # fmt: skip
            for b in self.by_block.values()
        ]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{widths[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        lines += [fmt.format(*head)] + [fmt.format(*r) for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def per_sample_macs(costs: StaticCosts, keep: Tensor, active: Tensor, placement: str) -> Tensor:
    """int64 [N] MACs from hard decisions: ``keep`` bool [N, blocks], ``active`` int [N, blocks]."""
    check_placement(placement)
    device = keep.device
    fixed = torch.tensor([b.fixed(placement) for b in costs.blocks], dtype=torch.int64, device=device)
    unit = torch.tensor([b.per_channel(placement) for b in costs.blocks], dtype=torch.int64, device=device)
    always = costs.base + sum(b.gate + b.shortcut for b in costs.blocks)
    return always + (keep.long() * (fixed + active.long() * unit)).sum(1)


def build_report(
    costs: StaticCosts,
    keep: Tensor,
    active: Tensor,
    placement: str,
    labels: Tensor | None = None,
    predictions: Tensor | None = None,
    masks: dict[str, Tensor] | None = None,
    usage: GateUsage | None = None,
) -> MacReport:
    """A report from hard decisions (``keep`` bool [N, blocks], ``active`` int [N, blocks])."""
    per_sample = per_sample_macs(costs, keep, active, placement)
    by_block = {}
    for j, c in enumerate(costs.blocks):
        k = keep[:, j]
        mean = c.gate + c.shortcut + (k.long() * (c.fixed(placement) + active[:, j] * c.per_channel(placement))).double().mean()
        frac = (active[k, j].double() / c.channels).mean() if c.channels and k.any() else torch.tensor(float("nan"))
        by_block[c.name] = BlockMacs(c.name, c.dense, c.gate, float(mean), float(1 - k.double().mean()), float(frac))
    return MacReport(
        per_sample=per_sample,
        dense=costs.dense,
        open=costs.open,
        placement=placement,
        counting=costs.counting,
        input_size=costs.input_size,
        by_block=by_block,
        keep=keep,
        active=active,
        labels=labels,
        predictions=predictions,
        masks=masks,
        costs=costs,
        usage=usage,
    )
