"""Early exits on a trained network, gated or not: train the heads (network frozen; finetune --exits trains them with it), then set a MAC budget at inference.

Examples:
  lcsurgery exits train --model cifar:resnet20 --checkpoint r20.th --data cifar10.tar.gz --epochs 5 --out runs/exits/r20
  lcsurgery exits train --run runs/tradeoff/sequential-70 --data cifar10.tar.gz --out runs/exits/gated   (exits and gates)
  lcsurgery exits evaluate runs/exits/r20 --budget 0.4
  lcsurgery exits evaluate runs/r20-exits --budget 0.4   (a finetune --exits run: the exits in it)
  lcsurgery exits evaluate runs/exits/r20 --max-macs 20000000
  lcsurgery exits evaluate runs/exits/r20 --budget 0.5 --policy learned   (Bolukbasi et al.'s learned exit decision)
  lcsurgery exits sweep runs/exits/r20      (rescore and rewrite the sweep, both policy rules)
  lcsurgery exits figure runs/exits/r20 --tradeoff runs/tradeoff   (the sweep beside per-budget trained runs)
  lcsurgery exits points --model cifar:resnet20     (where exits can go, and the MACs before each)

``train`` ends with a sweep of the budget knob (sweep.md, sweep.png, metrics.json); ``evaluate``
sets the policy for one budget on the run's held-out training images and runs the test set
through the early-exit engine, each image leaving at its exit (evaluate.json; exits_by_class.png:
where each class leaves; exits_extremes.png: the easiest and the hardest images; on a gated
network exits_channels.png: per class, the channels its images computed up to their exits).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from lcsurgery.bench.exit_latency import time_exits
from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.model import exit_points
from lcsurgery.exits.policy import MIN_SHARE, RULES, score
from lcsurgery.exits.usage import computed, usage
from lcsurgery.macs.report import dynamics
from lcsurgery.models.factory import SPEC_HELP, create_model
from lcsurgery.surgery.model import LCModel
from lcsurgery.train.exits import ExitsConfig, exit_loaders, exit_run_at_budget, exit_run_folder, exit_summary, format_shares, run_exits, sweep_run, train_exits

DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExitsConfig) if f.default is not dataclasses.MISSING}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="action", required=True)
    tr = sub.add_parser("train", help="attach exits to a pretrained network and train them, backbone frozen", description=train_exits.__doc__)
    tr.add_argument("--model", help=f"model spec: {SPEC_HELP} (with --run: the run's)")
    tr.add_argument("--data", required=True, help="a .tar.gz ImageFolder, cifar10:<dir>, or synthetic")
    tr.add_argument("--checkpoint", help="the trained network's weights (its classifier must fit the data)")
    tr.add_argument("--pretrained", action="store_true", help="the model's published weights (downloads)")
    tr.add_argument("--run", help="a lcsurgery finetune run folder: exits on its trained network, gates included")
    tr.add_argument("--out", default=DEFAULTS["out"])
    tr.add_argument("--at", nargs="+", default=list(DEFAULTS["at"]), help="'macs' (exits at 15, 30, ..., 90%% of the MACs), MAC fractions, or module names")
    tr.add_argument("--hidden", type=int, default=DEFAULTS["hidden"], help="width of a hidden layer in each head (0: SDN's linear head)")
    for name in ("epochs", "batch_size", "held_out", "seed"):
        tr.add_argument(f"--{name.replace('_', '-')}", type=int, default=DEFAULTS[name])
    tr.add_argument("--train-backbone", action="store_true", help="fine-tune the network with its exits (distilled from its starting self) instead of keeping it frozen")
    for name in ("lr", "backbone_lr", "distill_weight", "distill_temperature"):
        tr.add_argument(f"--{name.replace('_', '-')}", type=float, default=DEFAULTS[name])
    tr.add_argument("--size", type=int)
    tr.add_argument("--test-subset", type=int)
    tr.add_argument("--force", action="store_true", help="overwrite a finished run in --out")
    tr.add_argument("--device", help="where to train: cpu, cuda or cuda:N (default: the GPU when one is visible)")
    ev = sub.add_parser("evaluate", help="set a MAC budget (or a per-image cap) and run the test set through the exits")
    ev.add_argument("run", help="an exits run folder (or a finetune --exits run: the exits in it)")
    ev.add_argument("--budget", type=float, help="mean MACs per image as a fraction of the original network's (no gates, no exits; a pruned run: before pruning)")
    ev.add_argument("--max-macs", type=int, help="no image may cost more MACs than this")
    ev.add_argument("--test-subset", type=int, help="test images to run (class-balanced; default all)")
    ev.add_argument("--latency", type=int, metavar="N", help="also time N test images at batch 1 on the CPU, with and without exits (one thread)")
    ev.add_argument("--policy", choices=RULES, default="confidence", help="threshold each head's confidence, or a learned exit-or-go-on score (fitted on the held-out images)")
    ev.add_argument("--min-exit-share", type=float, default=MIN_SHARE, help=f"switch off heads that take fewer of the held-out images than this (they cost time at batch 1; 0: every head runs; default {MIN_SHARE})")
    sw = sub.add_parser("sweep", help="score a run's held-out and test images again and rewrite its sweep (both policy rules)")
    sw.add_argument("run", help="an exits run folder (or a finetune --exits run: the exits in it)")
    fg = sub.add_parser("figure", help="redraw a run's sweep, beside the separately trained points of a bench tradeoff folder")
    fg.add_argument("run", help="an exits run folder (or a finetune --exits run: the exits in it)")
    fg.add_argument("--tradeoff", help="a bench tradeoff folder (its results.json): static, Torch-Pruning and gated runs per budget")
    fg.add_argument("--also", nargs="+", default=[], help="other exits runs whose budget knob to draw beside RUN's (e.g. exits on a static or pruned run)")
    fg.add_argument("--out", help="the PNG to write (default: RUN/sweep.png)")
    pt = sub.add_parser("points", help="list where exits can go (a dry run of add_exits)")
    pt.add_argument("--model", required=True, help=f"model spec: {SPEC_HELP}")
    pt.add_argument("--size", type=int, help="input resolution (default: the model's)")


def run(args: argparse.Namespace) -> int:
    if args.action == "points":
        model = create_model(args.model)
        size = (3, args.size, args.size) if args.size else None
        for p in exit_points(model.eval(), input_size=size):
            print(p)
        return 0
    if args.action == "train":
        if args.run and not args.model:
            config = Path(args.run) / "config.json"
            if not config.exists():
                raise LCSurgeryError(f"{args.run} is not a lcsurgery finetune run folder (no config.json)")
            args.model = json.loads(config.read_text())["model"]
        if not args.model:
            raise LCSurgeryError("give --model (with --checkpoint or --pretrained), or --run")
        fields = {f.name for f in dataclasses.fields(ExitsConfig)}
        cfg = ExitsConfig(**{k: v for k, v in vars(args).items() if k in fields})
        train_exits(cfg)
        return 0
    args.run = exit_run_folder(Path(args.run))  # a finetune --exits run stands for the exits run in it
    if args.action == "sweep":
        sweep_run(args.run)
        return 0
    if args.action == "figure":
        return figure(args.run, Path(args.tradeoff) if args.tradeoff else None, Path(args.out) if args.out else None, [exit_run_folder(Path(a)) for a in args.also])
    return evaluate(args.run, args.budget, args.max_macs, args.test_subset, args.latency, args.policy, args.min_exit_share)


def _finished_sweep(run: Path) -> tuple[dict, dict]:
    """An exits run's metrics and config, or a clear error."""
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
    if "sweep" not in metrics:
        raise LCSurgeryError(f"{run} is not a finished exits run (no sweep in its metrics.json): lcsurgery exits sweep {run} writes one")
    return metrics, json.loads((run / "config.json").read_text())


def _network_name(cfg: dict) -> str:
    """What an exits run sits on: its finetune run's folder name (trained with it, for finetune --exits), or the model."""
    if cfg.get("joint"):
        return f"exits trained with {Path(cfg['run']).name}"
    return f"exits on {Path(cfg['run']).name}" if cfg.get("run") else f"exits on {cfg['model']}"


def figure(run: Path, tradeoff: Path | None, out: Path | None, also: list[Path] = ()) -> int:
    """The sweep of ``run`` as accuracy vs MACs, with a trade-off benchmark's trained points and
    the budget knobs of ``also`` (other exits runs) beside it."""
    from lcsurgery.viz.figures import exit_sweep_plot

    metrics, cfg = _finished_sweep(run)
    others = {}
    for other in also:
        m, c = _finished_sweep(other)
        name = _network_name(c)
        others[str(other) if name in others else name] = m
    trained = None
    if tradeoff is not None:
        if not (tradeoff / "results.json").exists():
            raise LCSurgeryError(f"{tradeoff} has no results.json: run lcsurgery bench tradeoff (or --report-only) there first")
        trained = json.loads((tradeoff / "results.json").read_text())["groups"]
    title = f"{cfg['model']} with exits ({'network trained with them' if cfg.get('train_backbone') or cfg.get('joint') else 'network frozen'}, {cfg['epochs']} epochs)"
    label = _network_name(cfg) if others else "exits, one model"
    print(f"wrote {exit_sweep_plot(metrics, out or run / 'sweep.png', title=title, trained=trained, others=others, label=label)}")
    return 0


def evaluate(
    run: Path, budget: float | None, max_macs: int | None, test_subset: int | None, latency: int | None = None, rule: str = "confidence", min_share: float = MIN_SHARE
) -> int:
    """Set the policy on the run's held-out images, then run the test images through the engine."""
    if budget is None and max_macs is None:
        raise LCSurgeryError("give --budget (a fraction of the dense MACs), --max-macs (MACs per image), or both")
    model, cfg, policy, test_loader = exit_run_at_budget(run, budget, test_subset, max_macs, rule, min_share=min_share)
    test = test_loader.data
    r = run_exits(model, test_loader)
    from lcsurgery.viz.figures import channel_heatmap, exits_by_class, extreme_images

    names = [*(p.name for p in model.points), "own head"]
    what = " and ".join(x for x in (f"budget {budget}" if budget else "", f"at most {max_macs:,} MACs" if max_macs else "") if x)
    figure_path = exits_by_class(r["exit"], r["label"], test.classes, names, run / "exits_by_class.png", title=f"where each class leaves, {what}")
    dense = model.dense_macs()
    extremes_path = extreme_images(
        test.images, r["macs"], r["label"], r["prediction"], test.classes, run / "exits_extremes.png", dense=dense, confidence=r["confidence"],
        title=f"easiest and hardest test images, {what}: leaving first (most confident first) and last (least confident first)",
    )  # fmt: skip
    ran = None
    if isinstance(model.backbone, LCModel):  # what each image's gates computed up to its exit
        decisions = computed(score(model, test_loader).gates, model.block_segments(), r["exit"])
        ran = dynamics(r["macs"], model.dense_macs(), usage(decisions, r["exit"]))
        heatmap = channel_heatmap(decisions.channel, r["label"], test.classes, run / "exits_channels.png", title=f"channels computed per class (gates up to each image's exit), {what}")
    result = {
        "budget": budget, "max_macs": max_macs, "policy": rule, "threshold": policy.thresholds[0] if policy else None,
        "heads_off": [model.points[i].name for i in policy.off] if policy else [], "dense_macs": dense,
        "test_images": len(r["macs"]), **exit_summary(r["prediction"] == r["label"], r["exit"], r["macs"], dense, model.num_exits),
    }  # fmt: skip
    shares = format_shares(result["exit_shares"], policy.off if policy else (), "%")
    print(f"{run}: top-1 {100 * result['accuracy']:.2f}% at {result['mac_fraction']:.3f} of the dense MACs on {result['test_images']} test images; "
          f"per-image MACs p90/p10 {result['p90_over_p10']:.2f}, most MACs of one image {result['max_macs_seen']:,}; leaving at each exit: {shares}")  # fmt: skip
    if ran is not None:
        result.update(distinct_patterns=ran["distinct_patterns"], conditional_gates=ran["conditional_gates"], conditional_by_block=ran["conditional_by_block"])
        print(f"what ran: {ran['distinct_patterns']} distinct computations (gates up to the exit, and the exit) over {ran['images']} images; "
              f"conditional gates (run and on for 5-95% of the images) {100 * ran['conditional_gates']:.1f}%; per class: {heatmap}")  # fmt: skip
    if latency:
        images = torch.cat([x for x, _ in exit_loaders(cfg, model.backbone, latency)[2]])
        result["latency"] = t = time_exits(model, images)
        print(f"batch 1, one thread, {len(images)} images: {t['no_exits_ms_per_image']:.2f} ms without exits, {t['exits_ms_per_image']:.2f} ms with: "
              f"{t['speedup']:.2f}x faster for {t['mac_ratio']:.2f}x fewer MACs (efficiency {t['efficiency']:.2f})")  # fmt: skip
    (run / "evaluate.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {run / 'evaluate.json'}, {figure_path}, {extremes_path}")
    return 0
