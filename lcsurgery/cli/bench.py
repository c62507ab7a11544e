"""Benchmarks that print tables and save JSON (not tests: numbers depend on the machine).

  lcsurgery bench latency [--models cifar:resnet20 ...] [--batches 1 64] [--threads 1]
  lcsurgery bench tradeoff --model cifar:resnet20 --checkpoint r20.th --data cifar10.tar.gz --epochs 3 --seeds 0 1 --baselines static torch-pruning [--recipes std importance]
  lcsurgery bench kernels [--models cifar:resnet20 ...] [--batches 1] [--threads 1]
  lcsurgery bench budget --builtin [--data cifar10.tar.gz --checkpoint r20.th] --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lcsurgery.bench import budget, kernels, latency, tradeoff
from lcsurgery.cli import finetune
from lcsurgery.errors import LCSurgeryError
from lcsurgery.train.config import FinetuneConfig


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="benchmark", required=True)
    lat = sub.add_parser("latency", help="dense vs converted latency, interleaved in one process", description=latency.__doc__)
    lat.add_argument("--models", nargs="*", default=list(latency.MODELS), help="model specs (CIFAR models run at 32x32, others at 224); none: the exits rows alone")
    lat.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    lat.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    lat.add_argument("--rounds", type=int, default=200, help="timed rounds per variant (each round runs every variant once)")
    lat.add_argument("--warmup", type=int, default=10)
    lat.add_argument("--checkpoint", nargs=2, action="append", metavar=("MODEL", "PATH"), help="weights for a model spec")
    lat.add_argument("--trained", nargs=2, action="append", metavar=("MODEL", "RUN_DIR"), help="also time the trained gates of a finetune run")
    lat.add_argument("--device", default="cpu", help="where to run: cpu, or cuda / cuda:N (timed with a synchronize after each call)")
    lat.add_argument("--exits", nargs="+", default=[], metavar="RUN_DIR", help="exits runs (lcsurgery exits train) to time with and without their exits")
    lat.add_argument("--exit-budget", type=float, default=0.5, help="the exits runs' MAC budget, a fraction of the dense MACs")
    lat.add_argument("--exit-images", type=int, default=256, help="test images per exits run (each round runs them all)")
    lat.add_argument("--out", default="runs/bench/latency.json")
    ker = sub.add_parser("kernels", help="how much of a channel cut the conv kernels turn into time", description=kernels.__doc__)
    ker.add_argument("--models", nargs="+", default=list(latency.MODELS), help="model specs (CIFAR models run at 32x32, others at 224)")
    ker.add_argument("--batches", nargs="+", type=int, default=[1])
    ker.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the whole run")
    ker.add_argument("--rounds", type=int, default=300, help="timed rounds per conv shape (capped at ~10 s a shape)")
    ker.add_argument("--warmup", type=int, default=20)
    ker.add_argument("--out", default="runs/bench/kernels.json")
    bu = sub.add_parser("budget", help="where short fine-tunes land against their MAC budgets, over seeds", description=budget.__doc__)
    bu.add_argument("--builtin", action="store_true", help="run on the built-in shapes task with the shipped ResNet-20")
    bu.add_argument("--data", help="another task's data (with --checkpoint: its pretrained cifar:resnet20 weights)")
    bu.add_argument("--checkpoint", help="pretrained cifar:resnet20 weights for --data")
    bu.add_argument("--placements", nargs="+", choices=("sequential", "parallel"), default=["sequential", "parallel"])
    bu.add_argument("--budgets", nargs="+", type=float, default=[0.35, 0.5, 0.7])
    bu.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    bu.add_argument("--report-only", action="store_true", help="tabulate the finished runs, train nothing")
    bu.add_argument("--out", default="runs/bench/budget")
    tr = sub.add_parser("tradeoff", help="dense fine-tune and LC-Net at several MAC budgets, both placements", description=tradeoff.__doc__)
    finetune.add_arguments(tr, single_run=False)
    tr.add_argument("--out", default="runs/tradeoff", help="one run folder per fine-tune, plus results.json/.md and tradeoff.png")
    tr.add_argument("--budgets", nargs="+", type=float, default=[0.7, 0.5, 0.35])
    tr.add_argument("--seeds", nargs="+", type=int, default=[0], help="repeat every run but the dense teacher per seed; the table gives the mean and each seed")
    tr.add_argument("--baselines", nargs="*", choices=tradeoff.BASELINES, default=["static"], help="static rows beside the dynamic ones: LC-Net's gates made static, and Torch-Pruning (needs lcsurgery[compare])")
    tr.add_argument("--recipes", nargs="*", choices=tuple(tradeoff.RECIPES), default=[], help="sequential rows trained with per-image gate options, beside the default recipe")
    tr.add_argument("--recipe-budgets", nargs="+", type=float, help="train the --recipes rows at these budgets only (default: every budget)")
    tr.add_argument("--exits", dest="exit_rows", action="store_true", help="add per budget the dynamic and the static gates trained with early exits a margin above the budget (finetune --exits) and set to it on held-out training images")
    tr.add_argument("--exit-margin", type=float, default=tradeoff.EXIT_MARGIN, help="how far above its budget an --exits run trains (its fraction of the dense MACs)")
    tr.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process with an equal share of the CPU threads (the dense run goes first: the others distil from it)")
    tr.add_argument("--report-only", action="store_true", help="tabulate and plot the finished runs, train nothing")


def run(args: argparse.Namespace) -> int:
    if args.benchmark == "tradeoff":
        base = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__ and k != "out"})
        if args.jobs < 1:
            raise LCSurgeryError(f"--jobs must be at least 1, got {args.jobs}")
        tradeoff.run(
            base, args.budgets, Path(args.out), train=not args.report_only, seeds=args.seeds, baselines=tuple(args.baselines), recipes=tuple(args.recipes),
            recipe_budgets=args.recipe_budgets, jobs=args.jobs, exits=args.exit_rows, exit_margin=args.exit_margin,
        )  # fmt: skip
    if args.benchmark == "budget":
        if bool(args.data) != bool(args.checkpoint):
            raise LCSurgeryError("bench budget: --data and --checkpoint go together (the task's data and its pretrained weights)")
        tasks = ([budget.BUILTIN] if args.builtin else []) + ([budget.Task(Path(args.data).name.split(".")[0], args.data, args.checkpoint)] if args.data else [])
        budget.run(tasks, args.placements, args.budgets, args.seeds, Path(args.out), train=not args.report_only)
    if args.benchmark == "latency":
        latency.run(
            args.models, args.batches, args.threads, args.rounds, args.warmup, Path(args.out),
            checkpoint=dict(args.checkpoint or []), trained=dict(args.trained or []), device=args.device,
            exits=args.exits, exit_budget=args.exit_budget, exit_images=args.exit_images,
        )  # fmt: skip
    if args.benchmark == "kernels":
        kernels.run(args.models, args.batches, args.threads, args.rounds, args.warmup, Path(args.out))
    return 0
