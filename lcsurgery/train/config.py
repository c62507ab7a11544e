"""``FinetuneConfig``: everything that defines a fine-tuning run, checked when it is made.

The CLI takes its defaults from here (one source), and a run folder stores its identity, so a
run is reproducible from its ``config.json`` and a resumption with other options is refused.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lcsurgery.errors import LCSurgeryError
from lcsurgery.train.budget import check_budget
from lcsurgery.train.conditional import KINDS as PER_IMAGE_LOSSES

GATE_KINDS = ("layer+channel", "layer", "channel")
PRUNERS = ("torch-pruning",)
_NOT_IDENTITY = {"out", "resume", "force", "workers"}  # may change between a run and its resumption


@dataclass
class FinetuneConfig:
    """Everything that defines a fine-tuning run (see ``lcsurgery finetune --help``)."""

    model: str
    data: str = "synthetic"
    out: str = "runs/finetune"
    placement: str = "parallel"
    gates: str = "layer+channel"  # which gates each block gets: "layer+channel", "layer" (skip blocks only) or "channel"
    dense: bool = False  # fine-tune the original model, no gates (the baseline)
    static: bool = False  # gates that ignore the input (bias only): one learned mask for every image, the static baseline
    static_channels: bool = False  # channel gates bias only (one channel mask for every image); the layer gates still read the image
    prune: str | None = None  # "torch-pruning": no gates; the model is pruned to --budget by Torch-Pruning first (the outside baseline)
    per_image_loss: str = "none"  # what makes gates decide per image (lcsurgery.train.conditional)
    per_image_weight: float = 1.0  # its weight in the loss (batch-shaping fades out over the MAC ramp); for "difficulty", the spread of the penalty's weights
    l1: float = 0.0  # penalty strength; with a budget, its initial value
    budget: float | None = None  # target fraction of dense MACs, adapts the penalty
    budget_ramp: float = 0.5  # share of training over which the MAC target falls from dense to the budget
    penalty: str = "macs"  # "macs": macs_penalty (hard cost, surrogate gradient); "l1": gate_l1 (the paper's)
    cost_aware: bool = True
    epochs: int = 5
    batch_size: int = 128  # per process
    lr: float = 0.03
    gate_lr: float | None = None  # None: auto_gate_lr(total steps)
    gate_optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    slope: float = 0.05
    gate_input_momentum: float = 0.0  # running-statistics momentum of the gates' standardised input (0: raw input)
    gate_noise: float = 0.2  # logistic noise on gate logits in training (see GatedBlock.noise)
    freeze_gates: float | str | None = "auto"  # share of training after which the gates stop learning; "auto": halfway from the ramp's end to the last step; None: never
    teacher: str | None = None  # distil from this dense model: "start" (the starting weights) or a weights file / run folder
    distill_weight: float = 0.9  # share of the distillation term in the loss, the rest is cross-entropy
    distill_temperature: float = 4.0
    size: int | None = None
    checkpoint: str | None = None
    pretrained: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    amp: bool = False
    exits: list | None = None  # early exits trained with the network: "macs", MAC fractions or block names (add_exits' ``at``); [] is "macs"
    exit_hidden: int = 0  # width of a hidden layer in each exit head (0: SDN's linear head)
    exit_lr: float = 3e-3  # the heads' (Adam, cosine to zero)
    exit_weight: float = 1.0  # weight of the heads' mean loss beside the network's own
    exit_held_out: int = 5000  # training images kept out of training, to set the exit policy on
    seed: int = 0
    resume: bool = False
    force: bool = False
    workers: int = 2

    def __post_init__(self) -> None:
        if self.per_image_loss not in PER_IMAGE_LOSSES:
            raise LCSurgeryError(f"--per-image-loss must be one of {', '.join(PER_IMAGE_LOSSES)}, got {self.per_image_loss!r}")
        if self.static and self.per_image_loss != "none":
            raise LCSurgeryError("--static gates read no input, so they cannot learn per-image decisions: drop --per-image-loss")
        if self.per_image_loss == "difficulty" and (self.penalty != "macs" or not 0.0 < self.per_image_weight <= 1.0):
            raise LCSurgeryError(
                f"--per-image-loss difficulty weights the MAC penalty per image by 1 +- --per-image-weight: it needs --penalty macs "
                f"and a weight in (0, 1], got --penalty {self.penalty} and {self.per_image_weight}"
            )
        if self.static_channels and (self.static or not self.gated or "channel" not in self.gates):
            raise LCSurgeryError("--static-channels makes the channel gates of a gated run static: it needs channel gates, and --static already makes every gate static")
        if self.gates not in GATE_KINDS:
            raise LCSurgeryError(f"--gates must be one of {', '.join(GATE_KINDS)}, got {self.gates!r}")
        if self.budget is not None:
            check_budget(self.budget)
        if self.prune is not None:
            if self.prune not in PRUNERS:
                raise LCSurgeryError(f"--prune must be one of {', '.join(PRUNERS)}, got {self.prune!r}")
            if self.budget is None or self.dense or self.static or self.l1 or self.per_image_loss != "none":
                raise LCSurgeryError("--prune prunes the model to --budget and fine-tunes it without gates: give --budget, and drop --dense, --static, --l1 and --per-image-loss")
        if self.dense and (self.budget is not None or self.l1 or self.static):
            raise LCSurgeryError("--dense fine-tunes the original model without gates: drop --budget, --l1 and --static")
        if self.teacher is not None and self.dense:
            raise LCSurgeryError("--teacher distils into a gated model: drop --dense or --teacher")
        if not 0.0 <= self.distill_weight <= 1.0 or self.distill_temperature <= 0:
            raise LCSurgeryError(f"--distill-weight must be in [0, 1] and --distill-temperature positive, got {self.distill_weight} and {self.distill_temperature}")
        if not 0.0 < self.budget_ramp < 1.0:
            raise LCSurgeryError(f"--budget-ramp is a share of training in (0, 1), got {self.budget_ramp}")
        if self.freeze_gates == "auto":
            self.freeze_gates = (1.0 + self.budget_ramp) / 2
        if self.freeze_gates is not None and not self.budget_ramp < self.freeze_gates <= 1.0:
            raise LCSurgeryError(
                f"--freeze-gates is the share of training after which the gates stop learning and must be in "
                f"(--budget-ramp, 1] = ({self.budget_ramp}, 1], got {self.freeze_gates}: the MAC target must reach the budget first"
            )
        if self.exits is not None:
            self.exits = [str(a) for a in self.exits] or ["macs"]
            if self.exit_held_out < 1 or self.exit_weight < 0 or self.exit_hidden < 0:
                raise LCSurgeryError("--exit-held-out must be positive, --exit-weight and --exit-hidden not negative")
        if self.epochs < 1 or self.batch_size < 1:
            raise LCSurgeryError("--epochs and --batch-size must be positive")

    def identity(self) -> dict:
        """The options that define the run's result (not where it is written or how it is resumed)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IDENTITY}

    @property
    def gated(self) -> bool:
        """Whether the run fine-tunes a model with LC-Net gates (not the dense or the pruned baseline)."""
        return not self.dense and self.prune is None
