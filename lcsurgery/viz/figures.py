"""Figures as PNG (matplotlib, no display needed): the paper's Fig. 5-7 and run diagnostics.

- ``tradeoff_plot``: accuracy vs mean MACs per image across budgets: dynamic gates per placement,
  static gates, Torch-Pruning, and the dense point (paper Fig. 5).
- ``extreme_images``: the test images needing the fewest and the most MACs (Fig. 6); with exits,
  the easiest (leaving first, most confident) and the hardest.
- ``channel_heatmap``: per-class fraction of images activating each gated channel of the last
  blocks (Fig. 7).
- ``macs_histogram``: distribution of per-image MACs for both placements.
- ``skip_rates``: per-block skip rate and active-channel fraction.
- ``gate_usage``: per block, the share of gates always off, conditional and always on.
- ``controller_plot``: the MAC fraction and penalty strength over training steps.
- ``exit_sweep_plot``: one model with early exits swept by its MAC budget knob, beside trained points.
- ``exits_by_class``: per class, the share of test images leaving at each exit under one budget.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

PLACEMENT_STYLE = {"sequential": ("tab:blue", "o"), "parallel": ("tab:orange", "s")}


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def _millions(x: float) -> float:
    return x / 1e6


SERIES_STYLE = {
    ("dynamic", "sequential"): ("tab:blue", "o", "-", "LC-Net dynamic, sequential"),
    ("dynamic", "parallel"): ("tab:orange", "s", "-", "LC-Net dynamic, parallel"),
    ("static", "sequential"): ("tab:green", "D", "--", "LC-Net static gates"),
    ("static", "parallel"): ("tab:olive", "d", "--", "LC-Net static gates, parallel"),
    ("torch-pruning", None): ("tab:purple", "^", ":", "Torch-Pruning"),
    ("static+exits", "sequential"): ("tab:brown", "X", "--", "LC-Net static gates + exits"),
    ("dynamic+exits", "sequential"): ("tab:red", "P", "-", "LC-Net dynamic + exits"),
}


def tradeoff_plot(groups: list[dict], path: Path, title: str = "") -> Path:
    """Top-1 accuracy against mean MACs per image: one line per kind of run (dynamic gates per
    placement, static gates, Torch-Pruning, gates with exits), the seeds' range as error bars, the dense model as a
    star, and the per-image recipes as gray points."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    for (kind, placement), (color, marker, style, label) in SERIES_STYLE.items():
        pts = [g for g in groups if g["kind"] == kind and g["placement"] == placement and g.get("recipe", "default") == "default"]
        pts.sort(key=lambda g: g["mean_macs"])
        if not pts:
            continue
        xs = np.array([_millions(g["mean_macs"]) for g in pts])
        ys = np.array([100 * g["val_accuracy"] for g in pts])
        accs = [np.array(g.get("accuracies") or [g["val_accuracy"]]) * 100 for g in pts]
        err = np.array([[y - a.min() for y, a in zip(ys, accs)], [a.max() - y for y, a in zip(ys, accs)]])
        ax.errorbar(xs, ys, yerr=err, marker=marker, color=color, linestyle=style, capsize=3, label=label)
        if kind == "dynamic" and placement == "sequential":
            for g, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(f"budget {g['budget']:.2f}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8, color=color)
    recipes = [g for g in groups if g.get("recipe", "default") != "default"]
    for g, marker in zip(recipes, "vP<>hX*", strict=False):
        label = f"dynamic, {g['recipe']} recipe" + (f" (budget {g['budget']:.2f})" if len({r['budget'] for r in recipes}) > 1 else "")
        ax.plot(_millions(g["mean_macs"]), 100 * g["val_accuracy"], marker=marker, color="tab:gray", linestyle="none", label=label)
    for g in groups:
        if g["kind"] == "dense":
            ax.plot(_millions(g["mean_macs"]), 100 * g["val_accuracy"], marker="*", markersize=14, color="black", linestyle="none", label="dense fine-tune")
    ax.set_xlabel("mean MACs per image (millions)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "accuracy vs MACs", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _show(img: Tensor) -> np.ndarray:
    """A CHW image (uint8, or float in [0, 1]) as HWC for imshow."""
    return (img if img.dtype == torch.uint8 else img.clamp(0, 1)).permute(1, 2, 0).cpu().numpy()


def extreme_picks(macs: Tensor, k: int, confidence: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Indices of the ``k`` images with the fewest MACs and of the ``k`` with the most; among equal
    MACs (every image leaving at one exit costs the same), the most confident come first among
    the fewest and the least confident first among the most."""
    order = torch.arange(len(macs))
    if confidence is not None:
        order = torch.argsort(confidence.double(), descending=True, stable=True)
    order = order[torch.argsort(macs[order].double(), stable=True)]
    return order[:k], order.flip(0)[:k]


def extreme_images(
    images: Tensor, macs: Tensor, labels: Tensor, preds: Tensor, classes: list[str], path: Path, k: int = 8, dense: float | None = None,
    confidence: Tensor | None = None, title: str = "test images needing the fewest and the most MACs",
) -> Path:
    """Two rows: the ``k`` images needing the fewest MACs and the ``k`` needing the most (``extreme_picks``)."""
    fewest, most = extreme_picks(macs, k, confidence)
    fig, axes = plt.subplots(2, k, figsize=(1.55 * k, 4.2), squeeze=False)
    for row, (label, idx) in enumerate((("fewest MACs", fewest), ("most MACs", most))):
        for col, i in enumerate(idx.tolist()):
            ax = axes[row, col]
            ax.imshow(_show(images[i]), interpolation="nearest")
            ok = preds[i] == labels[i]
            share = f" ({100 * float(macs[i]) / dense:.0f}%)" if dense else ""
            ax.set_title(f"{classes[int(labels[i])]}\n{_millions(float(macs[i])):.1f}M{share}", fontsize=7, color="black" if ok else "red")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(label, fontsize=9)
    fig.suptitle(f"{title} (true class; MACs per image; red: misclassified)", fontsize=9)
    return _save(fig, path)


def channel_heatmap(masks: dict[str, Tensor], labels: Tensor, classes: list[str], path: Path, blocks: int = 2, title: str = "channel activation per class") -> Path:
    """Per class, the fraction of images that activate each gated channel, for the ``blocks`` blocks
    whose channel use differs most between classes (the last blocks when no block differs)."""

    def per_class(m: Tensor) -> Tensor:
        return torch.stack([m[labels == c].mean(0) if (labels == c).any() else torch.zeros(m.shape[1]) for c in range(len(classes))])

    spread = {n: float(per_class(m.float()).std(0).mean()) for n, m in masks.items()}
    ranked = sorted(masks, key=lambda n: (spread[n], list(masks).index(n)), reverse=True)[:blocks]
    names = [n for n in masks if n in ranked]
    fig, axes = plt.subplots(1, len(names), figsize=(5.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        m = masks[name].float()
        order = torch.argsort(m.mean(0), descending=True)
        im = ax.imshow(per_class(m)[:, order].numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(classes)), classes, fontsize=7)
        ax.set_xlabel("gated channel (sorted by overall activation)", fontsize=8)
        ax.set_title(f"{name}: {m.shape[1]} channels (between-class spread {spread[name]:.3f})", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.03, pad=0.02, label="fraction of the class's images with the channel active")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def macs_histogram(per_placement: dict[str, Tensor], dense: float, path: Path, patterns: int | None = None) -> Path:
    """Histogram of MACs per image under each placement, with the dense model's cost marked and,
    per placement, the spread (p90/p10) that says whether images really differ in cost."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    lo = min(float(v.min()) for v in per_placement.values())
    bins = np.linspace(_millions(lo) * 0.95, _millions(dense) * 1.02, 40)
    for placement, values in per_placement.items():
        color, _ = PLACEMENT_STYLE[placement]
        v = values.double().numpy() / 1e6
        p10, p90 = np.percentile(v, [10, 90])
        ax.hist(v, bins=bins, alpha=0.55, color=color, label=f"{placement}: mean {v.mean():.2f}M, p10-p90 {p10:.2f}-{p90:.2f}M (x{p90 / p10:.2f})")
    ax.axvline(_millions(dense), color="black", linestyle="--", label=f"dense {_millions(dense):.2f}M")
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("images")
    if patterns is not None:
        n = len(next(iter(per_placement.values())))
        ax.set_title(f"{patterns} distinct gate patterns over {n} images", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def gate_usage(rates: dict[str, Tensor], path: Path, band: tuple[float, float] = (0.05, 0.95)) -> Path:
    """Per block, the share of its gates that are always off, conditional (on for some images
    only) or always on over the counted images: static gates show no middle band at all."""
    lo, hi = band
    names = list(rates)
    off = np.array([float((rates[n] <= lo).double().mean()) for n in names])
    on = np.array([float((rates[n] >= hi).double().mean()) for n in names])
    cond = 1 - off - on
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.5 * len(names)), 3.8))
    ax.bar(x, off, color="tab:gray", label=f"always off (on for <= {lo:.0%} of images)")
    ax.bar(x, cond, bottom=off, color="tab:purple", label="conditional: on for some images, off for others")
    ax.bar(x, on, bottom=off + cond, color="tab:green", label=f"always on (>= {hi:.0%})")
    every = torch.cat(list(rates.values())) if rates else torch.zeros(0)
    share = float(((every > lo) & (every < hi)).double().mean()) if every.numel() else 0.0
    ax.set_title(f"gates that depend on the image: {100 * share:.1f}% of all gates", fontsize=9)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("share of the block's gates (L-gate and C-gates)")
    ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.08), ncol=1, frameon=False)
    return _save(fig, path)


def skip_rates(by_block: dict, path: Path) -> Path:
    """Per block: how often it is skipped, and the mean fraction of its channels active when it runs."""
    names = list(by_block)
    skip = [by_block[n].skip_rate for n in names]
    active = [by_block[n].active_fraction for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.4, 0.45 * len(names)), 3.8))
    ax.bar(x - 0.2, skip, width=0.4, label="skip rate (L-Net)", color="tab:red")
    ax.bar(x + 0.2, [0 if np.isnan(a) else a for a in active], width=0.4, label="active channels when run (C-Net)", color="tab:green")
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize=7)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("fraction")
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def controller_plot(steps_file: Path, path: Path, budget: float | None = None) -> Path:
    """MAC fraction of training batches and the penalty strength over the steps of a run."""
    rows = [json.loads(line) for line in Path(steps_file).read_text().splitlines()]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, [r["mac_fraction"] for r in rows], color="tab:blue", label="MACs of training batches (fraction of dense)")
    if budget is not None:
        ax.axhline(budget, color="tab:blue", linestyle=":", label=f"budget {budget:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of dense MACs")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["penalty_strength"] for r in rows], color="tab:gray", alpha=0.7, label="penalty strength")
    ax2.set_yscale("symlog", linthresh=1e-2)  # negative after the ramp: paying closed gates to reopen
    ax2.set_ylabel("penalty strength (symlog)")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower left")
    return _save(fig, path)


def exit_sweep_plot(metrics: dict, path: Path, title: str = "", trained: list[dict] | None = None, others: dict[str, dict] | None = None, label: str = "exits, one model") -> Path:
    """Top-1 against mean MACs per image for one model with exits as its budget knob is swept,
    each exit alone (every image leaving there) as gray points, the dense model as a star,
    ``trained`` (``bench tradeoff`` groups) as separately trained points for comparison, and the
    knob curves of ``others`` (label: metrics of another exits run) beside it."""
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    dense = metrics["dense_macs"]
    rows = sorted(metrics["sweep"], key=lambda r: r["mac_fraction"])
    ax.plot([_millions(r["mac_fraction"] * dense) for r in rows], [100 * r["accuracy"] for r in rows], "o-", color="tab:red", markersize=4, label=f"{label}, budget knob")
    for (name, other), color in zip((others or {}).items(), itertools.cycle(("tab:purple", "tab:brown", "tab:olive", "tab:cyan"))):
        theirs = sorted(other["sweep"], key=lambda r: r["mac_fraction"])
        ax.plot([_millions(r["mac_fraction"] * other["dense_macs"]) for r in theirs], [100 * r["accuracy"] for r in theirs], "v-", color=color, markersize=4, label=f"{name}, budget knob")
    if "learned" in metrics:
        learned = sorted(metrics["learned"]["sweep"], key=lambda r: r["mac_fraction"])
        ax.plot([_millions(r["mac_fraction"] * dense) for r in learned], [100 * r["accuracy"] for r in learned], "s--", color="tab:orange", markersize=3, label="same, learned exit policy")
    xs = [_millions(c) for c in metrics.get("exit_mean_costs", metrics["exit_costs"])[:-1]]
    ax.plot(xs, [100 * a for a in metrics["exit_accuracy"][:-1]], "x", color="tab:gray", label="every image at one exit")
    for g in trained or []:
        if g["kind"] in ("static", "dynamic", "torch-pruning") and g.get("recipe", "default") == "default":
            color, marker, _, label = SERIES_STYLE[(g["kind"], g["placement"])]
            ax.plot(_millions(g["mean_macs"]), 100 * g["val_accuracy"], marker=marker, color=color, linestyle="none", label=f"{label} (trained per budget)")
        elif g["kind"] == "dense":
            ax.plot(_millions(g["mean_macs"]), 100 * g["val_accuracy"], marker="*", markersize=12, markerfacecolor="none", color="black", linestyle="none", label="dense fine-tune (trade-off benchmark)")
    ax.plot(_millions(metrics.get("backbone_macs", dense)), 100 * metrics["dense_accuracy"], marker="*", markersize=14, color="black", linestyle="none", label="network without exits")
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    ax.legend(unique.values(), unique.keys(), loc="lower right", fontsize=8)
    ax.set_xlabel("mean MACs per image (millions)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title or "early exits: accuracy vs MACs", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def exits_by_class(exit_of: Tensor, labels: Tensor, classes: list[str], exit_names: list[str], path: Path, title: str = "") -> Path:
    """Per class, a stacked bar of where its images leave (early exits in warm colours, the
    network's own head last): which classes the exits find easy."""
    k = len(exit_names)
    shares = np.array([[float((exit_of[labels == c] == e).float().mean()) if (labels == c).any() else 0.0 for e in range(k)] for c in range(len(classes))])
    order = np.argsort(-(shares * np.arange(k)).sum(1))  # hardest class (latest mean exit) on top
    fig, ax = plt.subplots(figsize=(7.2, 0.35 * len(classes) + 1.4))
    colors = plt.cm.viridis(np.linspace(0.95, 0.1, k))
    left = np.zeros(len(classes))
    for e in range(k):
        ax.barh(np.arange(len(classes)), shares[order, e], left=left[order], color=colors[e], label=exit_names[e])
        left += shares[:, e]
    ax.set_yticks(np.arange(len(classes)), [classes[i] for i in order], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the class's test images")
    ax.set_title(title or "where each class leaves", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=min(k, 7), fontsize=7, title="exit", title_fontsize=7)
    return _save(fig, path)
