"""The fine-tuning loop behind ``lcsurgery finetune``: L1 or MAC-budget training, logs, resume.

Per epoch: train with progress (loss, accuracy, current MAC fraction), evaluate in eval mode
with hard gates (accuracy, mean MACs under both placements, per-block skip rates), append a
line to ``log.jsonl``, and write ``last.pt`` (model, optimiser, scheduler, controller and RNG
state). At the end: ``model.pt`` (weights only) and ``metrics.json``. ``resume=True``
continues a killed run from its last finished epoch; a run is reproducible from its config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import lcsurgery
from lcsurgery.data.loaders import Loaders, make_loaders
from lcsurgery.data.sources import dataset_classes
from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.static import fvcore_macs
from lcsurgery.models.factory import create_model
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.train import distributed
from lcsurgery.train.budget import BudgetController
from lcsurgery.train.conditional import KINDS as PER_IMAGE_LOSSES
from lcsurgery.train.conditional import conditional_loss
from lcsurgery.train.optim import param_groups
from lcsurgery.train.regularize import gate_l1, macs_penalty

RUN_FILES = ("config.json", "log.jsonl", "steps.jsonl", "last.pt", "model.pt", "metrics.json")
STEP_LOG_EVERY = 10
CALIBRATION_IMAGES = 1024  # training images per side of the budget controller's eval/training cost gap
GATE_KINDS = ("layer+channel", "layer", "channel")
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
    per_image_loss: str = "none"  # what makes gates decide per image: none, importance, shaping or rates (lcsurgery.train.conditional)
    per_image_weight: float = 1.0  # its weight in the loss (batch-shaping fades out over the MAC ramp)
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
    seed: int = 0
    resume: bool = False
    force: bool = False
    workers: int = 2

    def __post_init__(self) -> None:
        if self.per_image_loss not in PER_IMAGE_LOSSES:
            raise LCSurgeryError(f"--per-image-loss must be one of {', '.join(PER_IMAGE_LOSSES)}, got {self.per_image_loss!r}")
        if self.static and self.per_image_loss != "none":
            raise LCSurgeryError("--static gates read no input, so they cannot learn per-image decisions: drop --per-image-loss")
        if self.gates not in GATE_KINDS:
            raise LCSurgeryError(f"--gates must be one of {', '.join(GATE_KINDS)}, got {self.gates!r}")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise LCSurgeryError(f"--budget is a fraction of the dense model's MACs and must be in (0, 1], got {self.budget}")
        if self.dense and (self.budget is not None or self.l1):
            raise LCSurgeryError("--dense fine-tunes the original model without gates: drop --budget and --l1")
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
        if self.epochs < 1 or self.batch_size < 1:
            raise LCSurgeryError("--epochs and --batch-size must be positive")

    def identity(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_IDENTITY}


def _prepare_out(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.out)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if cfg.resume:
        if not (out / "last.pt").exists():
            raise LCSurgeryError(f"nothing to resume in {out}: no last.pt (start the run without --resume)")
        saved = json.loads((out / "config.json").read_text())
        diff = {k: (saved.get(k), v) for k, v in cfg.identity().items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise LCSurgeryError(f"cannot resume {out} with a different configuration ({detail}); use another --out or the same options")
        return out
    if existing and not cfg.force:
        raise LCSurgeryError(f"{out} already holds a run ({', '.join(existing)}): pass --force to overwrite it or --resume to continue it")
    if existing:
        for f in existing:
            (out / f).unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.identity(), indent=2))
    return out


def build_model(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The model to fine-tune: created from its spec, converted unless dense, checkpoint loaded."""
    try:
        model = create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained)
    except (RuntimeError, OSError) as exc:
        if not cfg.pretrained:
            raise
        raise LCSurgeryError(f"could not fetch pretrained weights for {cfg.model} ({exc}); pass --checkpoint instead") from exc
    if not cfg.dense:
        size = cfg.size or _native_size(model)
        layers, channels = "layer" in cfg.gates, "channel" in cfg.gates
        model = lcsurgery.convert(model, cfg.placement, layers=layers, channels=channels, slope=cfg.slope, input_size=(3, size, size), static=cfg.static)
    if cfg.checkpoint:
        result = load_weights(model, cfg.checkpoint, reinit_head=True)
        if result.reinitialised:
            print(f"note: {', '.join(result.reinitialised)} re-initialised for {num_classes} classes")
    return model


def build_teacher(cfg: FinetuneConfig, num_classes: int) -> nn.Module:
    """The frozen dense model to distil from, in eval mode.

    ``"start"`` is the original model with the weights the run starts from (``--checkpoint``
    or ``--pretrained``): the gated model learns to keep what it had. A path names a weights
    file, or a run folder (its ``model.pt``), of a dense model of the same ``--model`` spec,
    such as the dense fine-tune of a trade-off benchmark.
    """
    model = create_model(cfg.model, num_classes=num_classes, pretrained=cfg.pretrained and cfg.teacher == "start")
    source = cfg.checkpoint if cfg.teacher == "start" else cfg.teacher
    if source is not None:
        path = Path(source)
        if path.is_dir():
            path = path / "model.pt"
        if not path.is_file():
            raise LCSurgeryError(f"--teacher {cfg.teacher}: no weights at {path} (give a weights file, a finished run folder, or 'start')")
        result = load_weights(model, path, reinit_head=cfg.teacher == "start")
        if result.reinitialised:
            raise LCSurgeryError(f"--teacher {cfg.teacher}: its classifier does not fit {num_classes} classes; distil from a model trained on this data")
    elif not cfg.pretrained:
        raise LCSurgeryError("--teacher start needs starting weights (--checkpoint or --pretrained): a random teacher teaches nothing")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's distillation term: KL(teacher || student) at a temperature, scaled by its square
    so that its gradients keep their size as the temperature changes."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher_logits / t, 1), reduction="batchmean", log_target=True) * t * t


def auto_gate_lr(steps: int, ramp: float) -> float:
    """Default gate learning rate: 3e-3, raised for short runs so gates can reach their decisions.

    Adam moves a gate logit by about one learning rate per step whatever the penalty strength,
    and gates start one unit above the decision boundary. The MAC target ramps down over the
    first ``ramp`` of training (the gate rate does not decay), so a gate can travel about
    ``ramp * steps * lr`` in that time: ``2 / (ramp * steps)`` allows two units.
    """
    return max(3e-3, 2.0 / max(ramp * steps, 1))


def make_optimizer(model: nn.Module, cfg: FinetuneConfig, steps: int) -> torch.optim.Optimizer:
    """SGD (Nesterov) for the backbone; the gates in the same SGD or, by default, in Adam.

    Adam normalises each gate's step: under SGD an L-gate, one scalar that carries a whole
    block's MACs, gets C times the push of any one of the block's C channel gates, reaches
    zero first, and retrofitting degenerates into skipping whole blocks for every input.
    """
    if cfg.dense:
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    gate_lr = cfg.gate_lr if cfg.gate_lr is not None else auto_gate_lr(steps, cfg.budget_ramp)
    backbone, gates = param_groups(model, cfg.lr, gate_lr, cfg.weight_decay)
    if cfg.gate_optimizer == "sgd":
        return torch.optim.SGD([backbone, gates], lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return _SgdAdam(backbone, _width_scaled(gates), cfg.momentum)


REFERENCE_WIDTH = 64  # gate input width where the Adam defaults were tuned (ResNet-20's widest block)


def _width_scaled(gates: dict) -> list[dict]:
    """One Adam group per gate tensor, weights of wide gates at ``lr * REFERENCE_WIDTH / width``.

    Adam moves every weight by about ``lr`` per step, so a gate logit moves by about ``lr`` times
    the L1 norm of its pooled input, which grows with the input width: at ResNet-50's 2048
    channels the first few steps closed almost every gate of a fresh model (we saw 17% of the
    dense MACs after three steps). Scaling by width makes a wide gate move at a narrow one's pace.
    """
    groups = []
    for p in gates["params"]:
        scale = min(1.0, REFERENCE_WIDTH / p.shape[1]) if p.dim() == 2 else 1.0
        groups.append({**gates, "params": [p], "lr": gates["lr"] * scale})
    return groups


class _SgdAdam(torch.optim.Optimizer):
    """One optimiser object (one scheduler, one state dict) stepping the backbone with SGD and the gates with Adam."""

    def __init__(self, backbone: dict, gates: list[dict], momentum: float) -> None:
        self.sgd = torch.optim.SGD([backbone], lr=backbone["lr"], momentum=momentum, nesterov=True)
        self.adam = torch.optim.Adam(gates, lr=gates[0]["lr"])
        super().__init__(self.sgd.param_groups + self.adam.param_groups, {})

    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        self.sgd.step()
        self.adam.step()

    def state_dict(self) -> dict:
        return {"sgd": self.sgd.state_dict(), "adam": self.adam.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.sgd.load_state_dict(state["sgd"])
        self.adam.load_state_dict(state["adam"])
        self.param_groups = self.sgd.param_groups + self.adam.param_groups  # loading replaced the group dicts


def _native_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if hasattr(model, "default_input_size"):
        return model.default_input_size[-1]
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return 224


def make_scheduler(opt: torch.optim.Optimizer, steps: int, freeze_gates: float | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay for the backbone; the gates keep their learning rate until ``freeze_gates``
    (a share of training; None: to the last step), then stop.

    Adam moves a gate by about one learning rate per step whatever the penalty strength, so
    under a decayed rate the gates freeze and the MAC budget controller loses its grip: as the
    gate noise faded, one 750-step parallel run's cost rose from 0.70 to 0.745 of dense and
    stayed there while the controller tripled the penalty. Hence a constant rate, then a clean
    stop: a 20-epoch sequential run whose gates kept learning to the end lost 1.5 points over its
    last six epochs (the penalty kept lowering open gates' values without closing any), and the
    same run with the gates stopped at 75% ended 1.43 points higher at the same MACs.
    """
    cosine = lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1)))  # noqa: E731
    stop = math.inf if freeze_gates is None else freeze_gates * steps
    gates = lambda step: 1.0 if step < stop else 0.0  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, [gates if g.get("name") == "gates" else cosine for g in opt.param_groups])


def gates_frozen(progress: float, freeze_gates: float | None) -> bool:
    """Whether the gates have stopped learning at this share of training (then no penalty either)."""
    return freeze_gates is not None and progress >= freeze_gates


def noise_factor(progress: float, ramp: float, end: float | None = None) -> float:
    """Gate noise over training: full while the MAC target ramps down, then fading to zero by
    ``end`` (default: halfway from the end of the ramp to the last step), so that the
    gates settle, and training ends, on exactly the function eval computes."""
    end = (1.0 + ramp) / 2 if end is None else end
    return min(max(1.0 - (progress - ramp) / (end - ramp), 0.0), 1.0)


def _set_gate_training(model: nn.Module, noise: float, stats_momentum: float) -> None:
    """This step's gate noise and input-statistics momentum, on every gated block."""
    for block in lcsurgery.gated_blocks(model):
        block.noise = noise
        block.stats_momentum = stats_momentum


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write never leaves a truncated checkpoint


@torch.no_grad()
def evaluate(model: nn.Module, loaders: Loaders, placement: str, dense: bool) -> dict:
    """Eval-mode accuracy and MACs per image (hard gates), for both placements when gated."""
    model.eval()
    if dense:
        device = _device(model)
        correct = total = 0
        for x, y in loaders.test:
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            total += len(y)
        macs = fvcore_macs(model, (torch.zeros(1, *x.shape[1:], device=device),))
        return {"val_accuracy": correct / total, "mean_macs": macs, "dense_macs": macs, "mac_fraction": 1.0}
    report = lcsurgery.count_macs(model, loaders.test, placement, progress=False)
    other = report.with_placement("sequential" if placement == "parallel" else "parallel")
    return {
        "val_accuracy": report.accuracy,
        "mean_macs": report.mean,
        "dense_macs": report.dense,
        "mac_fraction": report.ratio,
        "mean_macs_by_placement": {placement: report.mean, other.placement: other.mean},
        "skip_rates": {n: round(b.skip_rate, 4) for n, b in report.by_block.items()},
        # null, not NaN, for blocks without a C-Net or never run: NaN is not JSON (jq and browsers reject it)
        "active_fraction": {n: None if math.isnan(b.active_fraction) else round(b.active_fraction, 4) for n, b in report.by_block.items()},
    }


@torch.no_grad()
def _cost_gap(model: nn.Module, loaders: Loaders, placement: str) -> tuple[float, float]:
    """The MAC fraction eval pays and the one training batches report, for the model as it is now.

    Eval: eval mode on un-augmented training images (the test set never steers training).
    Training: training mode (BatchNorm on batch statistics, running statistics left untouched,
    the current gate noise) on augmented training batches. Measuring both on one model state
    keeps the budget controller's offset free of the batch-to-batch swings of its running average.
    """
    device = _device(model)
    model.eval()
    plain = _first_images(loaders.calibration, device)
    eval_fraction = lcsurgery.count_macs(model, plain, placement, progress=False).ratio
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch: unchanged
    blocks = lcsurgery.gated_blocks(model)
    momenta = [b.stats_momentum for b in blocks]
    for b in blocks:
        b.stats_momentum = 0.0  # the gates' input statistics, likewise
    model.train()
    macs = []
    try:
        for x in _first_images(loaders.train, device):
            model(x)
            macs.append(lcsurgery.last_macs(model, placement).double())
    finally:
        for b, momentum in zip(blocks, momenta):
            b.stats_momentum = momentum
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)
    dense = lcsurgery.static_costs(model, tuple(plain[0].shape[1:])).dense
    return eval_fraction, float(torch.cat(macs).mean()) / dense


def _first_images(loader, device: torch.device) -> list[torch.Tensor]:
    images = []
    for x, _ in loader:
        images.append(x.to(device))
        if sum(map(len, images)) >= CALIBRATION_IMAGES:
            break
    return images


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning job; returns the final metrics (also in ``<out>/metrics.json``)."""
    d = distributed.setup()
    try:
        return _finetune(cfg, d)
    finally:
        distributed.teardown()


def _finetune(cfg: FinetuneConfig, d: distributed.Dist) -> dict:
    torch.manual_seed(cfg.seed)
    num_classes = len(dataset_classes(cfg.data))
    model = build_model(cfg, num_classes).to(d.device)
    with torch.random.fork_rng(devices=[]):  # the teacher's throwaway initialisation leaves the run's random stream alone
        teacher = build_teacher(cfg, num_classes).to(d.device) if cfg.teacher else None
    out = _prepare_out(cfg) if d.main else Path(cfg.out)  # after the model and teacher load: a bad checkpoint leaves --out untouched
    d.barrier()
    loaders = make_loaders(
        cfg.data, model, cfg.batch_size, size=cfg.size, seed=cfg.seed, rank=d.rank, world=d.world,
        train_subset=cfg.train_subset, test_subset=cfg.test_subset, workers=cfg.workers,
    )  # fmt: skip
    lc = None if cfg.dense else model
    train_model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if d.world > 1 else model
    steps = cfg.epochs * len(loaders.train)
    opt = make_optimizer(model, cfg, steps)
    sched = make_scheduler(opt, steps, cfg.freeze_gates)
    controller = BudgetController(cfg.budget, strength=cfg.l1 or 1.0, ramp=cfg.budget_ramp) if cfg.budget is not None else None
    start = 0
    if cfg.resume:
        state = torch.load(out / "last.pt", map_location=d.device, weights_only=True)
        model.load_state_dict(state["model"])
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError as exc:  # e.g. parameter groups laid out by another lcsurgery version
            raise LCSurgeryError(f"cannot resume {out}: its optimiser state does not fit this optimiser ({exc}); start again with --force") from exc
        sched.load_state_dict(state["scheduler"])
        if controller is not None:
            controller.load_state_dict(state["controller"])
        torch.set_rng_state(state["rng"])
        start = state["epoch"]
        if d.main:
            print(f"resuming {out} after epoch {start}")
    scaler = torch.amp.GradScaler(enabled=cfg.amp and d.device.type == "cuda")
    amp_dtype = torch.float16 if d.device.type == "cuda" else torch.bfloat16
    metrics: dict = {}
    for epoch in range(start, cfg.epochs):
        t0 = time.time()
        loaders.train.set_epoch(epoch)
        train_model.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(loaders.train, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not d.main, dynamic_ncols=True)
        for x, y in bar:
            progress = sched.last_epoch / steps
            frozen = gates_frozen(progress, cfg.freeze_gates)
            if lc is not None:
                noise = cfg.gate_noise * noise_factor(progress, cfg.budget_ramp, cfg.freeze_gates)
                _set_gate_training(lc, noise, 0.0 if frozen else cfg.gate_input_momentum)
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=cfg.amp):
                logits = train_model(x)
                loss = F.cross_entropy(logits, y)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    w = cfg.distill_weight
                    loss = (1 - w) * loss + w * distill_loss(logits.float(), teacher_logits.float(), cfg.distill_temperature)
            info = {}
            if lc is not None:
                frac = d.mean(float(lcsurgery.last_macs(lc).double().mean()) / lcsurgery.static_costs(lc, tuple(x.shape[1:])).dense)
                if frozen:  # the gates no longer learn: a penalty would only cost time
                    strength = 0.0
                else:
                    strength = controller.update(frac, progress) if controller is not None else cfg.l1
                if strength:
                    penalty = macs_penalty(lc) if cfg.penalty == "macs" else gate_l1(lc, cost_aware=cfg.cost_aware)
                    loss = loss + strength * penalty
                weight = cfg.per_image_weight * (max(1.0 - progress / cfg.budget_ramp, 0.0) if cfg.per_image_loss == "shaping" else 1.0)
                if not frozen and weight > 0 and cfg.per_image_loss != "none":
                    loss = loss + weight * conditional_loss(lc, cfg.per_image_loss)
                info = {"macs": f"{frac:.3f}", "penalty": "frozen" if frozen else f"{strength:.3g}"}
            loss_value = d.mean(loss.item())  # the same on every rank, so all of them stop together
            if not math.isfinite(loss_value):
                last = f"epoch {epoch}" if epoch else "nothing yet"
                raise LCSurgeryError(
                    f"training diverged: the loss is {loss_value} at step {sched.last_epoch + 1} (epoch {epoch + 1}); "
                    f"stopped instead of training on NaN. {out / 'last.pt'} holds {last}. Rerun with a lower --lr or --gate-lr "
                    f"(see steps.jsonl for the loss and penalty strength before it)"
                )
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss_value * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", **info)
            if d.main and lc is not None and sched.last_epoch % STEP_LOG_EVERY == 0:
                with open(out / "steps.jsonl", "a") as f:
                    f.write(json.dumps({"step": sched.last_epoch, "epoch": epoch + 1, "loss": loss_value, "mac_fraction": frac, "penalty_strength": strength}) + "\n")
        if d.main:
            metrics = evaluate(model, loaders, cfg.placement, cfg.dense)
        if controller is not None and not gates_frozen(sched.last_epoch / steps, cfg.freeze_gates):
            eval_fraction, train_fraction = _cost_gap(model, loaders, cfg.placement) if d.main else (0.0, 0.0)
            controller.calibrate(d.broadcast(eval_fraction), d.broadcast(train_fraction))
            metrics["mac_fraction_train_images"] = {"eval": eval_fraction, "training": train_fraction}
        if d.main:
            record = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen, **metrics, "lr": sched.get_last_lr()[0], "seconds": round(time.time() - t0, 1)}
            if lc is not None:
                record["gates_frozen"] = gates_frozen(sched.last_epoch / steps, cfg.freeze_gates)
            if controller is not None:
                record["penalty_strength"] = 0.0 if record["gates_frozen"] else controller.strength
            with open(out / "log.jsonl", "a") as log:
                log.write(json.dumps(record) + "\n")
            state = {"epoch": epoch + 1, "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}
            if controller is not None:
                state["controller"] = controller.state_dict()
            _save(out / "last.pt", state)
            print(f"epoch {epoch + 1}: val accuracy {metrics['val_accuracy']:.4f}, MACs {metrics['mac_fraction']:.3f} of dense")
        d.barrier()
    in_sync = d.parameters_identical(model)
    if d.main:
        if not metrics:
            metrics = evaluate(model, loaders, cfg.placement, cfg.dense)
        _save(out / "model.pt", model.state_dict())
        final = {**metrics, "placement": None if cfg.dense else cfg.placement, "epochs": cfg.epochs, "model": cfg.model, "data": cfg.data, "budget": cfg.budget, "l1": cfg.l1, "world_size": d.world, "ranks_identical": in_sync}
        (out / "metrics.json").write_text(json.dumps(final, indent=2))
        return final
    return {}
