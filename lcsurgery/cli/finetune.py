"""Fine-tune a model with LC-Net gates: an L1 penalty, or a MAC budget that sets it for you.

Examples:
  lcsurgery finetune --model cifar:resnet20 --checkpoint r20.th --data cifar10.tar.gz --budget 0.5 --out runs/r20-b50
  lcsurgery finetune --model timm:resnet50 --pretrained --data cifar10.tar.gz --size 96 --placement sequential --l1 0.5 --epochs 5 --out runs/r50
  torchrun --nproc_per_node 4 -m lcsurgery.cli finetune ...   (multi-GPU / multi-node)
"""

from __future__ import annotations

import argparse
import json
import sys

from lcsurgery.models.factory import SPEC_HELP
from lcsurgery.train.loop import FinetuneConfig, finetune


def add_arguments(p: argparse.ArgumentParser, single_run: bool = True) -> None:
    """The finetune options; ``single_run=False`` leaves out those a multi-run benchmark sets per run."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--model", required=True, help=f"model spec: {SPEC_HELP}")
    p.add_argument("--data", default="synthetic", help="a .tar.gz ImageFolder, an ImageFolder tree, cifar10:<dir>, or synthetic (built in)")
    if single_run:
        p.add_argument("--out", default="runs/finetune", help="run folder: config, log.jsonl, last.pt, model.pt, metrics.json")
        p.add_argument("--placement", choices=("parallel", "sequential"), default="parallel", help="the schedule MACs are accounted (and budgeted) for")
        p.add_argument("--dense", action="store_true", help="fine-tune the original model without gates (the baseline)")
        p.add_argument("--l1", type=float, default=0.0, help="strength of the gate L1 penalty (with --budget: its starting value)")
        p.add_argument("--budget", type=float, help="target MACs as a fraction of the dense model's, in (0, 1]; adapts the penalty")
        p.add_argument("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
        p.add_argument("--force", action="store_true", help="overwrite a run already in --out")
    p.add_argument("--budget-ramp", type=float, default=0.5, help="share of training over which the MAC target falls from dense to --budget")
    p.add_argument("--penalty", choices=("macs", "l1"), default="macs", help="macs: the hard MAC cost with surrogate gradients; l1: gate L1 (the paper's)")
    p.add_argument("--no-cost-aware", dest="cost_aware", action="store_false", help="plain L1 instead of weighting gates by the MACs they control")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.03, help="backbone learning rate (cosine schedule)")
    p.add_argument("--gate-lr", type=float, help="gate learning rate (default: 3e-3, raised for runs under ~1300 steps)")
    p.add_argument("--gate-optimizer", choices=("adam", "sgd"), default="adam", help="optimiser for the gates (the backbone uses SGD)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--slope", type=float, default=0.05, help="ReLU-1 gradient slope outside [0, 1] in training")
    p.add_argument("--gate-input-momentum", type=float, default=0.0, help="standardise the gates' input by running statistics with this momentum (0: raw input)")
    p.add_argument("--gate-noise", type=float, default=0.2, help="scale of the logistic noise on gate logits in training (0: none)")
    p.add_argument("--freeze-gates", type=_share_or_auto, default="auto", help="share of training after which the gates stop learning and the penalty ends, so the backbone's last epochs train against fixed gates; the gate noise fades out by then (default: auto, halfway from the end of --budget-ramp to the last step: 0.75)")
    p.add_argument("--no-freeze-gates", dest="freeze_gates", action="store_const", const=None, help="the gates learn to the last step (the gate noise still fades out halfway from the end of --budget-ramp to the last step)")
    p.add_argument("--teacher", help="distil from a dense model: 'start' (the starting weights), a weights file or run folder of the same --model, or in 'bench tradeoff' 'dense' (its own dense run)")
    p.add_argument("--distill-weight", type=float, default=0.9, help="share of the distillation term in the loss (with --teacher)")
    p.add_argument("--distill-temperature", type=float, default=4.0, help="softmax temperature of the distillation term")
    p.add_argument("--size", type=int, help="input resolution (resize the data to it)")
    p.add_argument("--checkpoint", help="weights to start from (original or converted; a classifier of another size is re-initialised)")
    p.add_argument("--pretrained", action="store_true", help="start from the hub's pretrained weights (needs network access)")
    p.add_argument("--train-subset", type=int, help="use only this many training images (class-balanced)")
    p.add_argument("--test-subset", type=int, help="evaluate on only this many test images (class-balanced)")
    p.add_argument("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="data loader workers (ImageFolder trees only)")


def _share_or_auto(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share of training such as 0.75, or auto; got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    cfg = FinetuneConfig(**{k: v for k, v in vars(args).items() if k in FinetuneConfig.__dataclass_fields__})
    metrics = finetune(cfg)
    if metrics:
        json.dump({k: metrics[k] for k in ("val_accuracy", "mean_macs", "dense_macs", "placement")}, sys.stdout, indent=2)
        print()
    return 0
