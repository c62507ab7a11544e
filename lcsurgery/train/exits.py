"""Training early exits on a pretrained network, and the budget sweep of the result.

``train_exits`` attaches the heads (``lcsurgery.exits.model.add_exits``) and trains them on the
training images minus a held-out part, each by cross-entropy plus distillation. By default every
backbone weight and statistic stays frozen (the network's own output never changes, and teaches
the heads); ``train_backbone`` fine-tunes the network with its exits, every output distilled
from the network as it started, so early layers learn features the early heads can use. The held-out training images then set the exit policy for each budget of
a sweep (``lcsurgery.exits.policy``); the test set only measures it. A run folder holds
``config.json``, ``log.jsonl``, ``model.pt`` (backbone and heads), ``metrics.json`` (per-exit
accuracy and the sweep), ``sweep.md`` and ``sweep.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lcsurgery.data.loaders import ArrayLoader, normalization
from lcsurgery.data.sources import load_arrays
from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.model import ExitModel, ExitPolicy, add_exits
from lcsurgery.exits.policy import MIN_SHARE, ExitScores, fit_policy, fit_scorer, score, set_budget, simulate
from lcsurgery.exits.usage import computed, usage
from lcsurgery.macs.report import dynamics
from lcsurgery.models.factory import create_model
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.surgery.model import LCModel
from lcsurgery.train.distill import distill_loss
from lcsurgery.train.distributed import resolve_device
from lcsurgery.train.run_folder import EXITS_FOLDER, load_run

SWEEP = tuple(round(0.2 + 0.05 * i, 2) for i in range(17))  # 0.20 ... 1.00


@dataclasses.dataclass
class ExitsConfig:
    """Everything that defines an exits run (see ``lcsurgery exits train --help``)."""

    model: str
    data: str
    checkpoint: str | None = None
    run: str | None = None  # a ``lcsurgery finetune`` run folder: exits on its trained (gated) network
    pretrained: bool = False
    out: str = "runs/exits"
    at: tuple = ("macs",)  # "macs", MAC fractions, or module names (add_exits' ``at``)
    hidden: int = 0  # width of a hidden layer in each head (0: SDN's linear head)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3  # the heads' (Adam, cosine to zero)
    train_backbone: bool = False  # fine-tune the network with its exits, distilled from its starting self
    backbone_lr: float = 0.01  # SGD with Nesterov momentum, cosine to zero
    distill_weight: float = 0.5  # share of distillation from the network's own output in each head's loss
    distill_temperature: float = 3.0
    held_out: int = 5000  # training images kept out of head training to set the exit policy
    size: int | None = None
    test_subset: int | None = None
    seed: int = 0
    force: bool = False
    device: str | None = None  # where to train and score: None picks the GPU when one is visible, as finetune does
    joint: bool = False  # the heads were trained together with the network of ``run`` (lcsurgery finetune --exits)

    def __post_init__(self) -> None:
        self.at = tuple(self.at)  # the CLI and config.json give a list
        if self.epochs < 1:
            raise LCSurgeryError(f"epochs must be at least 1, got {self.epochs}")
        if not 0 <= self.distill_weight <= 1:
            raise LCSurgeryError(f"distill_weight must be in [0, 1], got {self.distill_weight}")


def exit_places(at: tuple | list) -> str | list:
    """``add_exits``' ``at`` from the words of a config or command line: "macs", fractions or names."""
    if list(at) == ["macs"]:
        return "macs"
    try:
        return [float(a) for a in at]
    except (TypeError, ValueError):
        return list(at)


def build_exit_model(cfg: ExitsConfig) -> ExitModel:
    """The trained network with heads attached (its classifier must already fit the data: it stays
    frozen): the model's checkpoint or published weights, or the gated network of a finetune run."""
    classes = load_arrays(cfg.data, "train").classes
    if cfg.run:
        if cfg.checkpoint or cfg.pretrained:
            raise LCSurgeryError("--run brings its own trained weights: drop --checkpoint and --pretrained")
        model, _, run_classes = load_run(Path(cfg.run))
        if run_classes != len(classes):
            raise LCSurgeryError(f"{cfg.run} classifies {run_classes} classes, {cfg.data} has {len(classes)}")
        if cfg.train_backbone and isinstance(model, LCModel):
            raise LCSurgeryError(
                f"--train-backbone would train {cfg.run}'s gates with no MAC budget to hold them to the one they were trained for: "
                f"train the heads alone on a gated run (drop --train-backbone)"
            )
    else:
        model = create_model(cfg.model, num_classes=len(classes), pretrained=cfg.pretrained)
        if cfg.checkpoint:
            load_weights(model, cfg.checkpoint)
        elif not cfg.pretrained:
            raise LCSurgeryError("exits train the heads of a trained network and leave it frozen: pass --checkpoint, --pretrained or --run")
    size = (3, cfg.size, cfg.size) if cfg.size else None  # None: the model's own, as convert resolves it
    exits = add_exits(model.eval(), exit_places(cfg.at), input_size=size, hidden=cfg.hidden)
    for p in exits.backbone.parameters():
        p.requires_grad_(False)
    return exits


def exit_loaders(cfg: ExitsConfig, model: torch.nn.Module, test_subset: int | None) -> tuple[ArrayLoader, ArrayLoader, ArrayLoader]:
    """Training images minus the held-out part (augmented), the held-out part and ``test_subset``
    test images (None: all), normalised as ``model`` expects."""
    mean, std = normalization(model)
    train, held = load_arrays(cfg.data, "train").split(cfg.held_out)
    test = load_arrays(cfg.data, "test").subset(test_subset)
    common = dict(mean=mean, std=std, size=cfg.size, seed=cfg.seed)
    return (
        ArrayLoader(train, cfg.batch_size, train=True, **common),
        ArrayLoader(held, 256, train=False, **common),
        ArrayLoader(test, 256, train=False, **common),
    )


def train_exits(cfg: ExitsConfig) -> dict:
    """Train the heads, then sweep the budget knob; returns (and writes) the run's metrics."""
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if (out / "metrics.json").exists() and not cfg.force:
        raise LCSurgeryError(f"{out} holds a finished exits run; pass --force to overwrite it or use another --out")
    device = resolve_device(cfg.device)
    model = build_exit_model(cfg).to(device)
    train, held, test = exit_loaders(cfg, model.backbone, cfg.test_subset)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    (out / "log.jsonl").unlink(missing_ok=True)
    teacher = _start_teacher(model) if cfg.train_backbone else None
    steps = cfg.epochs * len(train)
    opts = [torch.optim.Adam(model.heads.parameters(), lr=cfg.lr)]
    if teacher is not None:
        opts.append(torch.optim.SGD(model.backbone.parameters(), lr=cfg.backbone_lr, momentum=0.9, nesterov=True, weight_decay=5e-4))
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, steps) for o in opts]
    for epoch in range(cfg.epochs):
        t0 = time.time()
        train.set_epoch(epoch)
        model.backbone.train(teacher is not None)
        model.heads.train()
        seen, loss_sum = 0, 0.0
        bar = tqdm(train, desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = exit_loss(model, x, y, cfg.distill_weight, cfg.distill_temperature, teacher)
            for o in opts:
                o.zero_grad(set_to_none=True)
            loss.backward()
            for o, sch in zip(opts, scheds, strict=True):
                o.step()
                sch.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}")
        held_scores = score(model, held)
        accs = exit_accuracies(held_scores)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "held_out_accuracy": accs, "seconds": round(time.time() - t0, 1)}
        with open(out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"epoch {epoch + 1}: held-out accuracy per exit {' '.join(f'{a:.3f}' for a in accs)}")
    torch.save(model.state_dict(), out / "model.pt")
    start = None if teacher is None else _accuracy(teacher, test)
    return write_sweep(model, cfg, held_scores, score(model, test), test.data.classes, start)  # the last epoch's held-out scores: the model has not changed since


def sweep_run(run: Path) -> dict:
    """Score a finished run's held-out and test images again and rewrite its sweep (metrics.json,
    sweep.md, sweep.png): for runs made before a policy rule existed, or after a change of accounting."""
    model, cfg = load_exit_run(run)
    model.to(resolve_device())  # the machine's own, not the one the run was trained on
    cfg = dataclasses.replace(cfg, out=str(run))
    _, held, test = exit_loaders(cfg, model.backbone, cfg.test_subset)
    old = json.loads((Path(run) / "metrics.json").read_text()) if (Path(run) / "metrics.json").exists() else {}
    return write_sweep(model, cfg, score(model, held), score(model, test), test.data.classes, old.get("start_accuracy"))


def write_sweep(model: ExitModel, cfg: ExitsConfig, held: ExitScores, test: ExitScores, classes: list[str], start_accuracy: float | None) -> dict:
    """The sweep of both policy rules into the run folder, with its figures; returns the metrics."""
    out = Path(cfg.out)
    metrics = sweep_report(model, held, test)
    metrics["start_accuracy"] = start_accuracy if start_accuracy is not None else metrics["dense_accuracy"]
    metrics.update(model=cfg.model, run=cfg.run, data=cfg.data, epochs=cfg.epochs, exits=[p.name for p in model.points])
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "sweep.md").write_text(format_sweep(metrics) + "\n")
    from lcsurgery.viz.figures import exit_sweep_plot, exits_by_class

    exit_sweep_plot(metrics, out / "sweep.png", title=f"{cfg.model} with exits, {cfg.epochs} epochs of {'joint training' if cfg.joint else 'training' if cfg.train_backbone else 'head training'}")
    half = next((r for r in metrics["sweep"] if r["budget"] == 0.5), None)
    if half is not None:
        exit_of, _ = simulate(test, model.exit_costs(), ExitPolicy((half["threshold"],) * model.num_exits, off=tuple(half["off"])))
        exits_by_class(exit_of, test.labels, classes, [*metrics["exits"], "own head"], out / "exits_by_class.png", title="where each class leaves at half the MACs")
    print(format_sweep(metrics))
    return metrics


def _start_teacher(model: ExitModel) -> torch.nn.Module:
    """A frozen copy of the network as it starts, to distil every exit and the final head from."""
    teacher = copy.deepcopy(model.backbone).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    return teacher


def exit_loss(model: ExitModel, x: torch.Tensor, y: torch.Tensor, distill_weight: float, temperature: float, teacher: torch.nn.Module | None = None) -> torch.Tensor:
    """Mean over the heads of (1 - w) cross-entropy + w distillation. With no ``teacher`` the
    backbone is frozen: it runs without gradients and its own output teaches the heads; with one,
    the backbone's output is trained too and every head learns from the teacher."""
    if teacher is None:
        maps = []
        with torch.no_grad():
            h = x
            for i in range(model.num_exits):
                h = model.segment(i, h)
                maps.append(h)
            target = model.segment(model.num_exits, h)
        outs = [head(m) for head, m in zip(model.heads, maps, strict=True)]
    else:
        outs = model.forward_exits(x)
        with torch.no_grad():
            target = teacher(x)
    return heads_loss(outs, y, target, distill_weight, temperature)


def heads_loss(outs: list[torch.Tensor], y: torch.Tensor, target: torch.Tensor, distill_weight: float, temperature: float) -> torch.Tensor:
    """Mean over the heads' logits ``outs`` of (1 - w) cross-entropy + w distillation from ``target``."""
    losses = [(1 - distill_weight) * F.cross_entropy(o, y) + distill_weight * distill_loss(o.float(), target.float(), temperature) for o in outs]
    return torch.stack(losses).mean()


def _accuracy(model: torch.nn.Module, loader: ArrayLoader) -> float:
    device = next(model.parameters()).device
    with torch.no_grad():
        correct = sum(int((model(x.to(device)).argmax(1).cpu() == y).sum()) for x, y in loader)
    return correct / len(loader.data)


def exit_accuracies(scores: ExitScores) -> list[float]:
    """Top-1 of every exit and last of the network's own head."""
    return (scores.prediction == scores.labels[:, None]).float().mean(0).tolist()


def policy_row(model: ExitModel, test: ExitScores, policy: ExitPolicy) -> dict:
    """Accuracy and cost on the test scores under ``policy``; on a gated network also how many
    distinct computations the images take and the share of conditional gates, counted over what
    each image ran up to its exit (``lcsurgery.exits.usage``)."""
    exit_of, macs = simulate(test, model.exit_costs(), policy)
    correct = test.prediction.gather(1, exit_of[:, None]).squeeze(1) == test.labels
    row = {"threshold": policy.thresholds[0], "off": list(policy.off), **exit_summary(correct, exit_of, macs, model.dense_macs(), model.num_exits)}
    if test.gates is not None:
        ran = usage(computed(test.gates, model.block_segments(), exit_of), exit_of)
        dyn = dynamics(macs, model.dense_macs(), ran)
        row.update(distinct_patterns=dyn["distinct_patterns"], conditional_gates=dyn["conditional_gates"])
    return row


def exit_run_at_budget(
    run: Path, budget: float | None, test_subset: int | None, max_macs: int | None = None, rule: str = "confidence", on: Path | None = None,
    min_share: float = MIN_SHARE,
) -> tuple[ExitModel, ExitsConfig, ExitPolicy | None, ArrayLoader]:
    """A finished exits run with its policy set for ``budget`` (and ``max_macs``) on its held-out
    training images, its configuration and policy, and a loader of its first ``test_subset`` test
    images. ``on``: the finetune run whose network the exits must sit on (checked before any scoring)."""
    model, cfg = load_exit_run(run)
    if on is not None and (cfg.run is None or Path(cfg.run).resolve() != Path(on).resolve()):
        raise LCSurgeryError(f"{run} holds exits on {cfg.run or cfg.model}, not on {on}: train them with lcsurgery exits train --run {on}")
    _, held, test = exit_loaders(cfg, model.backbone, test_subset)
    policy = set_budget(model, budget, calibration=held, max_macs=max_macs, rule=rule, min_share=min_share)
    return model, cfg, policy, test


def run_exits(model: ExitModel, loader: ArrayLoader) -> dict[str, torch.Tensor]:
    """Every image of ``loader`` through the engine, each leaving at its exit: per image (on the CPU)
    the prediction, its softmax probability, the exit taken, the MACs paid and the label."""
    out: dict[str, list] = {"prediction": [], "confidence": [], "exit": [], "macs": [], "label": []}
    device = next(model.parameters()).device
    with torch.no_grad():
        for x, y in loader:
            probs = model(x.to(device)).float().softmax(1)
            out["prediction"].append(probs.argmax(1).cpu())
            out["confidence"].append(probs.amax(1).cpu())
            out["exit"].append(model.last_exit.cpu())
            out["macs"].append(model.last_macs.cpu())
            out["label"].append(y.cpu())
    return {k: torch.cat(v) for k, v in out.items()}


def exit_summary(correct: torch.Tensor, exit_of: torch.Tensor, macs: torch.Tensor, dense: int, num_exits: int) -> dict:
    """Top-1, mean fraction of the dense MACs with its 10/50/90th percentiles, the costliest image
    and the share leaving at each exit, from per-image results (the sweep's and evaluate's rows)."""
    frac = macs.double() / dense
    q = torch.quantile(frac, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {
        "accuracy": float(correct.float().mean()), "mac_fraction": float(frac.mean()),
        "p10": q[0], "p50": q[1], "p90": q[2], "p90_over_p10": q[2] / q[0], "max_macs_seen": int(macs.max()),
        "exit_shares": torch.bincount(exit_of, minlength=num_exits + 1).div(len(exit_of)).tolist(),
    }  # fmt: skip


def sweep_report(model: ExitModel, held: ExitScores, test: ExitScores, budgets: tuple[float, ...] = SWEEP) -> dict:
    """Per budget: the policy set on held-out images, its accuracy and cost on the test images;
    under the confidence rule (``sweep``) and the learned one (``learned``, fitted on the same
    held-out images)."""
    costs, dense = model.exit_costs(), model.dense_macs()
    accs = exit_accuracies(test)
    # what the network costs with no early exit (under 1 with gates): larger budgets change nothing
    top = float(simulate(held, costs, ExitPolicy((2.0,) * model.num_exits))[1].double().mean() / dense)
    chosen = sorted({*(b for b in budgets if b < top), min(top, max(budgets))})
    report = {
        "dense_accuracy": accs[-1], "dense_macs": dense, "exit_costs": costs, "exit_fractions": [c / dense for c in costs], "exit_accuracy": accs,
        "exit_mean_costs": test.costs.double().mean(0).tolist() if test.costs is not None else costs,
        "backbone_macs": (float(test.costs[:, -1].double().mean()) if test.costs is not None else costs[-1]) - sum(model.head_macs()),
        "test_images": len(test), "held_out_images": len(held),
    }  # fmt: skip
    report.update(_sweep(model, held, test, chosen, None))
    if held.labels is not None and held.features is not None:
        scorer = fit_scorer(held)
        report["learned"] = {"scorer": scorer, **_sweep(model, held, test, chosen, scorer)}
    return report


def _sweep(model: ExitModel, held: ExitScores, test: ExitScores, budgets: list[float], scorer: tuple | None) -> dict:
    costs, dense = model.exit_costs(), model.dense_macs()
    base = exit_accuracies(test)[-1]
    rows = []
    for b in budgets:
        try:
            policy = fit_policy(held, costs, dense, b, scorer=scorer)
        except LCSurgeryError:
            continue  # below the cheapest policy
        row = {"budget": b, "held_out_fraction": float(simulate(held, costs, policy)[1].double().mean() / dense), **policy_row(model, test, policy)}
        rows.append({**row, "drop_points": 100 * (base - row["accuracy"])})
    return {
        "sweep": rows, "best_within_1_point": _cheapest(rows, 1.0), "best_within_3_points": _cheapest(rows, 3.0),
        "worst_budget_error": max((abs(r["mac_fraction"] - r["budget"]) / r["budget"] for r in rows if r["budget"] < 1), default=None),
    }  # fmt: skip


def _cheapest(rows: list[dict], points: float) -> dict | None:
    ok = [r for r in rows if r["drop_points"] <= points]
    return min(ok, key=lambda r: r["mac_fraction"]) if ok else None


def format_sweep(m: dict) -> str:
    """Markdown: the per-exit accuracy, then one row per budget of the sweep."""
    lines = [
        "| exit | " + " | ".join(m.get("exits", [str(i) for i in range(len(m["exit_costs"]) - 1)])) + " | own head |",
        "|---|" + "---|" * len(m["exit_costs"]),
        "| MACs (mean, fraction of dense) | " + " | ".join(f"{c / m['dense_macs']:.3f}" for c in m.get("exit_mean_costs", m["exit_costs"])) + " |",
        "| top-1 (test) | " + " | ".join(f"{100 * a:.2f}%" for a in m["exit_accuracy"]) + " |",
        "",
        f"Without exits: {100 * m['dense_accuracy']:.2f}% at {m.get('backbone_macs', m['dense_macs']) / 1e6:.2f}M MACs"
        + (f" ({m['backbone_macs'] / m['dense_macs']:.3f} of the dense network's {m['dense_macs'] / 1e6:.2f}M)" if m.get("backbone_macs", m["dense_macs"]) < m["dense_macs"] else "")
        + (f" (the network before training: {100 * m['start_accuracy']:.2f}%)" if m.get("start_accuracy", m["dense_accuracy"]) != m["dense_accuracy"] else "")
        + f". Policy set on {m['held_out_images']} held-out training images, measured on {m['test_images']} test images.",
        "",
        "Confidence rule (one threshold on every head's top softmax probability):",
        "",
        *_sweep_table(m),
    ]
    if "learned" in m:
        lines += ["", "Learned rule (per exit, a classifier of whether leaving there loses nothing, fitted on the same held-out images):", "", *_sweep_table(m["learned"])]
    return "\n".join(lines)


def format_shares(shares: list[float], off: Sequence[int] = (), unit: str = "") -> str:
    """The share of images leaving at each exit, in percent ("off" for a head switched off)."""
    return " / ".join("off" if i in off else f"{100 * s:.0f}{unit}" for i, s in enumerate(shares))


def _sweep_table(m: dict) -> list[str]:
    gated = any("distinct_patterns" in r for r in m["sweep"])  # a gated network: what each image ran, up to its exit
    extra = " distinct computations (gates up to the exit, and the exit) | conditional gates |" if gated else ""
    lines = [
        "| MAC budget | threshold | top-1 | vs no exit (points) | fraction of dense MACs (test) | p90/p10 | share leaving at each exit (off: head not run) |" + extra,
        "|---|---|---|---|---|---|---|" + "---|---|" * gated,
    ]
    for r in m["sweep"]:
        shares = format_shares(r["exit_shares"], r.get("off", ()))
        budget = f"{r['budget']:.2f}" if abs(r["budget"] - round(r["budget"], 2)) < 1e-9 else f"{r['budget']:.3f} (no early exit)"  # the sweep's top: what the network costs run to the end
        row = f"| {budget} | {r['threshold']:.3f} | {100 * r['accuracy']:.2f}% | {-r['drop_points']:+.2f} | {r['mac_fraction']:.3f} | {r['p90_over_p10']:.2f} | {shares} |"
        if gated:
            row += f" {r['distinct_patterns']} | {100 * r['conditional_gates']:.1f}% |" if "distinct_patterns" in r else " - | - |"
        lines.append(row)
    for key, pts in (("best_within_1_point", 1), ("best_within_3_points", 3)):
        best = m.get(key)
        if best:
            lines.append(f"\nWithin {pts} point{'s' if pts > 1 else ''} of the network without exits: {best['mac_fraction']:.3f} of the dense MACs, top-1 {100 * best['accuracy']:.2f}%.")
    return lines


def exit_run_folder(run: Path) -> Path:
    """``run`` itself if it is an exits run; for a ``finetune --exits`` run, the exits run inside it."""
    run = Path(run)
    inner = run / EXITS_FOLDER
    if (inner / "config.json").exists() and not _is_exits_run(run):
        return inner
    return run


def _is_exits_run(run: Path) -> bool:
    return (run / "config.json").exists() and "at" in json.loads((run / "config.json").read_text())


def load_exit_run(run: Path) -> tuple[ExitModel, ExitsConfig]:
    """The model of a finished exits run folder, with its configuration."""
    run = Path(run)
    if (run / "config.json").exists() and not _is_exits_run(run):
        raise LCSurgeryError(f"{run} is a finetune run without exits: train them with lcsurgery exits train --run {run} (or finetune --exits)")
    if not (run / "model.pt").exists():
        raise LCSurgeryError(f"{run} is not a finished exits run (no model.pt)")
    cfg = ExitsConfig(**{**json.loads((run / "config.json").read_text()), "force": False})
    model = build_exit_model(cfg)
    model.load_state_dict(torch.load(run / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), cfg
