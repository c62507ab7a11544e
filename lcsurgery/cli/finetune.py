"""Fine-tune a model with LC-Net gates: an L1 penalty, or a MAC budget that sets it for you.

Examples:
  lcsurgery finetune --model cifar:resnet20 --checkpoint r20.th --data cifar10.tar.gz --budget 0.5 --out runs/r20-b50
  lcsurgery finetune --model timm:resnet50 --pretrained --data cifar10.tar.gz --size 96 --placement sequential --l1 0.5 --epochs 5 --out runs/r50
  lcsurgery finetune --model cifar:resnet20 --checkpoint r20.th --data cifar10.tar.gz --budget 0.7 --placement sequential --exits --out runs/r20-exits
      (gates and early exits trained together; then: lcsurgery exits evaluate runs/r20-exits/exits --budget 0.5)
  torchrun --nproc_per_node 4 -m lcsurgery.cli finetune ...   (multi-GPU / multi-node; not with --exits)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from lcsurgery.models.factory import SPEC_HELP
from lcsurgery.train.conditional import KINDS as PER_IMAGE_LOSSES
from lcsurgery.train.config import GATE_KINDS, PRUNERS, FinetuneConfig
from lcsurgery.train.loop import finetune

# One source for every default: the parser takes FinetuneConfig's, so a default changes in one place.
CONFIG_DEFAULTS = {f.name: f.default for f in dataclasses.fields(FinetuneConfig) if f.default is not dataclasses.MISSING}


def add_arguments(p: argparse.ArgumentParser, single_run: bool = True) -> None:
    """The finetune options; ``single_run=False`` leaves out those a multi-run benchmark sets per run."""
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    dests = []

    def add(*names: str, **kwargs) -> None:
        dests.append(p.add_argument(*names, **kwargs).dest)

    add("--model", required=True, help=f"model spec: {SPEC_HELP}")
    add("--data", help="a .tar.gz ImageFolder, an ImageFolder tree, cifar10:<dir>, or synthetic (built in)")
    if single_run:
        add("--out", help="run folder: config, log.jsonl, last.pt, model.pt, metrics.json")
        add("--placement", choices=("parallel", "sequential"), help="the schedule MACs are accounted (and budgeted) for")
        add("--dense", action="store_true", help="fine-tune the original model without gates (the baseline)")
        add("--prune", choices=PRUNERS, help="no gates: prune the model to --budget with this pruner, then fine-tune it (the outside static baseline; needs lcsurgery[compare])")
        add("--static", action="store_true", help="gates that ignore the input (bias only): one learned mask of blocks and channels for every image, the static baseline")
        add("--static-channels", action="store_true", help="channel gates bias only (one channel mask for every image), layer gates still per image")
        add("--l1", type=float, help="strength of the gate L1 penalty (with --budget: its starting value)")
        add("--budget", type=float, help="target MACs as a fraction of the dense model's, in (0, 1]; adapts the penalty")
        add("--resume", action="store_true", help="continue the run in --out from its last finished epoch")
        add("--force", action="store_true", help="overwrite a run already in --out")
        add("--exits", nargs="*", metavar="AT", help="train early exits with the network: at 'macs' (the default: 15, 30, ..., 90%% of the MACs), MAC fractions or block names; writes OUT/exits, an exits run (lcsurgery exits evaluate OUT/exits --budget B)")
        add("--exit-hidden", type=int, help="width of a hidden layer in each exit head (0: a linear head)")
        add("--exit-lr", type=float, help="the exit heads' learning rate (Adam, cosine)")
        add("--exit-weight", type=float, help="weight of the exit heads' mean loss beside the network's own")
        add("--exit-held-out", type=int, help="training images kept out of training to set the exit policy on (with --exits)")
    add("--gates", choices=GATE_KINDS, help="gates per block: both (the default), layer (skip whole blocks only) or channel (skip channels only)")
    add("--per-image-loss", choices=PER_IMAGE_LOSSES, help="what makes the gates decide per image: importance (targets from activation mass), shaping (batch-shaping), difficulty (the MAC penalty weighted per image, easy images most), or none")
    add("--per-image-weight", type=float, help="weight of --per-image-loss in the loss; for difficulty, the spread of the penalty's per-image weights, in (0, 1]")
    add("--budget-ramp", type=float, help="share of training over which the MAC target falls from dense to --budget")
    add("--penalty", choices=("macs", "l1"), help="macs: the hard MAC cost with surrogate gradients; l1: gate L1 (the paper's)")
    add("--no-cost-aware", dest="cost_aware", action="store_false", help="plain L1 instead of weighting gates by the MACs they control")
    add("--epochs", type=int)
    add("--batch-size", type=int, help="per process")
    add("--lr", type=float, help="backbone learning rate (cosine schedule)")
    add("--gate-lr", type=float, help="gate learning rate (default: 3e-3, raised for runs under ~1300 steps)")
    add("--gate-optimizer", choices=("adam", "sgd"), help="optimiser for the gates (the backbone uses SGD)")
    add("--weight-decay", type=float)
    add("--slope", type=float, help="ReLU-1 gradient slope outside [0, 1] in training")
    add("--gate-input-momentum", type=float, help="standardise the gates' input by running statistics with this momentum (0: raw input)")
    add("--gate-noise", type=float, help="scale of the logistic noise on gate logits in training (0: none)")
    add("--freeze-gates", type=_share_or_auto, help="share of training after which the gates stop learning and the penalty ends, so the backbone's last epochs train against fixed gates; the gate noise fades out by then (default: auto, halfway from the end of --budget-ramp to the last step: 0.75)")
    add("--no-freeze-gates", dest="freeze_gates", action="store_const", const=None, help="the gates learn to the last step (the gate noise still fades out halfway from the end of --budget-ramp to the last step)")
    add("--teacher", help="distil from a dense model: 'start' (the starting weights), a weights file or run folder of the same --model, or in 'bench tradeoff' 'dense' (its own dense run)")
    add("--distill-weight", type=float, help="share of the distillation term in the loss (with --teacher)")
    add("--distill-temperature", type=float, help="softmax temperature of the distillation term")
    add("--size", type=int, help="input resolution (resize the data to it)")
    add("--checkpoint", help="weights to start from (original or converted; a classifier of another size is re-initialised)")
    add("--pretrained", action="store_true", help="start from the hub's pretrained weights (needs network access)")
    add("--train-subset", type=int, help="use only this many training images (class-balanced)")
    add("--test-subset", type=int, help="evaluate on only this many test images (class-balanced)")
    add("--amp", action="store_true", help="mixed precision (bfloat16 on CPU, float16 on GPU)")
    add("--seed", type=int)
    add("--workers", type=int, help="data loader workers (ImageFolder trees only)")
    p.set_defaults(**{d: CONFIG_DEFAULTS[d] for d in dests if d in CONFIG_DEFAULTS})


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
