"""The fine-tuning loop behind ``lcsurgery finetune``: L1 or MAC-budget training, logs, resume.

Per epoch: train with a progress bar (loss, accuracy, current MAC fraction), evaluate in eval
mode with hard gates, append a line to ``log.jsonl`` and write ``last.pt``. At the end:
``model.pt`` (weights only) and ``metrics.json``. ``resume=True`` continues a killed run from
its last finished epoch; a run is reproducible from its config. Under torchrun every rank runs
this loop on its shard and rank 0 writes the run folder.

With ``exits``, early-exit heads train together with the network (and its gates): each head by
cross-entropy and distillation from the network's own output, on the training images less a
held-out part, which then sets the exit policy; the run folder gets ``exits/``, an exits run
(``lcsurgery exits evaluate OUT/exits --budget B``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from lcsurgery.data.loaders import make_loaders
from lcsurgery.data.sources import dataset_classes
from lcsurgery.errors import LCSurgeryError
from lcsurgery.exits.model import ExitModel, add_exits
from lcsurgery.exits.policy import score
from lcsurgery.macs.dynamic import last_macs
from lcsurgery.macs.static import static_costs
from lcsurgery.train import distributed
from lcsurgery.train.budget import BudgetController, budget_report, land
from lcsurgery.train.build import build_model
from lcsurgery.train.conditional import conditional_loss, difficulty_weights
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.distill import build_teacher, distill_loss
from lcsurgery.train.evaluate import cost_gap, evaluate, first_images
from lcsurgery.train.exits import ExitsConfig, exit_accuracies, exit_loaders, exit_places, heads_loss, write_sweep
from lcsurgery.train.optim import make_optimizer, make_scheduler, static_paces
from lcsurgery.train.regularize import gate_l1, macs_penalty
from lcsurgery.train.run_folder import EXITS_FOLDER, STRUCTURE_FILE, prepare_out, save
from lcsurgery.train.schedule import gates_frozen, noise_factor, set_gate_training

STEP_LOG_EVERY = 10


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) a fine-tuning job; returns the final metrics (also in ``<out>/metrics.json``)."""
    d = distributed.setup()
    try:
        return _Run(cfg, d).run()
    finally:
        distributed.teardown()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class _Run:
    """One fine-tuning job: the model, its optimiser and controller, and the epoch loop."""

    def __init__(self, cfg: FinetuneConfig, d: distributed.Dist) -> None:
        self.cfg, self.d = cfg, d
        torch.manual_seed(cfg.seed)
        num_classes = len(dataset_classes(cfg.data))
        saved = Path(cfg.out) / STRUCTURE_FILE
        structure = json.loads(saved.read_text()) if cfg.resume and cfg.prune is not None and saved.exists() else None
        self.model = build_model(cfg, num_classes, structure).to(d.device)
        self.exits: ExitModel | None = None
        if cfg.exits is not None:
            if d.world > 1:
                raise LCSurgeryError("--exits trains on one process: run it without torchrun")
            self.exits = add_exits(self.model, exit_places(cfg.exits), input_size=(3, cfg.size, cfg.size) if cfg.size else None, hidden=cfg.exit_hidden)
            self.model = self.exits.backbone  # add_exits copies the network: train the copy its segments run
        pruned = getattr(self.model, "lc_pruned", None)
        self.reference_macs = pruned["reference_macs"] if pruned else None
        with torch.random.fork_rng(devices=[]):  # the teacher's throwaway initialisation leaves the run's random stream alone
            self.teacher = build_teacher(cfg, num_classes).to(d.device) if cfg.teacher else None
        # after the model and teacher load: a bad checkpoint leaves --out untouched
        self.out = prepare_out(cfg) if d.main else Path(cfg.out)
        if pruned and d.main:
            (self.out / STRUCTURE_FILE).write_text(json.dumps(pruned["structure"], indent=2))
        d.barrier()
        if cfg.gated and not cfg.checkpoint and not cfg.pretrained and d.main:
            _warn(
                "fine-tuning gates on a model with random weights (no --checkpoint or --pretrained): with no task loss to "
                "resist it the penalty closes gates freely, and LC-Net has nothing to retrofit; pass pretrained weights"
            )
        self.loaders = make_loaders(
            cfg.data, self.model, cfg.batch_size, size=cfg.size, seed=cfg.seed, rank=d.rank, world=d.world,
            train_subset=cfg.train_subset, test_subset=cfg.test_subset, workers=cfg.workers, held_out=cfg.exit_held_out if cfg.exits is not None else None,
        )  # fmt: skip
        if self.exits is not None:
            _, self.held, self.exit_test = exit_loaders(self._exits_config(), self.model, cfg.test_subset)
        self.lc = self.model if cfg.gated else None
        ddp = d.world > 1
        self.train_model = DistributedDataParallel(self.model, device_ids=[d.local_rank] if d.device.type == "cuda" else None) if ddp else self.model
        self.steps = cfg.epochs * len(self.loaders.train)
        # bias-only gates learn at an image-reading gate's pace (rank 0's, so every rank steps alike)
        paces = {k: d.broadcast(v) for k, v in static_paces(self.model, self.loaders.train).items()} if cfg.gated else {}
        self.opt = make_optimizer(self.model, cfg, self.steps, paces)
        self.sched = make_scheduler(self.opt, self.steps, cfg.freeze_gates)
        if self.exits is not None:
            self.head_opt = torch.optim.Adam(self.exits.heads.parameters(), lr=cfg.exit_lr)
            self.head_sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.head_opt, self.steps)
        self.controller = BudgetController(cfg.budget, strength=cfg.l1 or 1.0, ramp=cfg.budget_ramp) if cfg.gated and cfg.budget is not None else None
        self.landing: dict | None = None  # what land() did when the gates froze (None: not yet)
        self.scaler = torch.amp.GradScaler(enabled=cfg.amp and d.device.type == "cuda")
        self.amp_dtype = torch.float16 if d.device.type == "cuda" else torch.bfloat16
        self.start = self._resume() if cfg.resume else 0

    def _resume(self) -> int:
        state = torch.load(self.out / "last.pt", map_location=self.d.device, weights_only=True)
        self.model.load_state_dict(state["model"])
        try:
            self.opt.load_state_dict(state["optimizer"])
        except ValueError as exc:  # e.g. parameter groups laid out by another lcsurgery version
            raise LCSurgeryError(f"cannot resume {self.out}: its optimiser state does not fit this optimiser ({exc}); start again with --force") from exc
        self.sched.load_state_dict(state["scheduler"])
        if self.exits is not None:
            self.exits.heads.load_state_dict(state["heads"])
            self.head_opt.load_state_dict(state["heads_optimizer"])
            self.head_sched.load_state_dict(state["heads_scheduler"])
        if self.controller is not None:
            self.controller.load_state_dict(state["controller"])
            self.landing = state.get("landing")
        torch.set_rng_state(state["rng"])
        if self.d.main:
            print(f"resuming {self.out} after epoch {state['epoch']}")
        return state["epoch"]

    def run(self) -> dict:
        metrics: dict = {}
        for epoch in range(self.start, self.cfg.epochs):
            metrics = self._epoch(epoch)
        if self.controller is not None and self.landing is None:  # gates that never froze are landed once training ends
            self._land()
            metrics = {}
        in_sync = self.d.parameters_identical(self.model)
        if not self.d.main:
            return {}
        if not metrics:
            metrics = evaluate(self.model, self.loaders, self.cfg.placement, not self.cfg.gated, self.reference_macs)
        save(self.out / "model.pt", self.model.state_dict())
        cfg = self.cfg
        if self.exits is not None:
            metrics = {**metrics, "exits": self._write_exits()}
        final = {
            **metrics, "placement": cfg.placement if cfg.gated else None, "prune": cfg.prune, "epochs": cfg.epochs, "model": cfg.model, "data": cfg.data,
            "budget": cfg.budget, "l1": cfg.l1, "world_size": self.d.world, "ranks_identical": in_sync,
        }  # fmt: skip
        if cfg.budget is not None:
            final.update(budget_report(final["mac_fraction"], cfg.budget))
            if self.landing is not None:
                final["landing"] = self.landing
        (self.out / "metrics.json").write_text(json.dumps(final, indent=2))
        if self.controller is not None and not final["budget_met"]:
            _warn(
                f"the run ended at {final['mac_fraction']:.3f} of the dense MACs for a budget of {cfg.budget} "
                f"({100 * final['budget_error']:+.1f}%, more than 5% off): the controller had not settled on the budget when the "
                f"gates froze at {cfg.freeze_gates} of training (steps.jsonl traces it). Longer training (--epochs), a longer "
                f"--budget-ramp or a lower --gate-lr give it time"
            )
        return final

    def _epoch(self, epoch: int) -> dict:
        cfg, d = self.cfg, self.d
        t0 = time.time()
        self.loaders.train.set_epoch(epoch)
        self.train_model.train()
        if self.exits is not None:
            self.exits.heads.train()
        seen = correct = 0
        loss_sum = 0.0
        bar = tqdm(self.loaders.train, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not d.main, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            logits, loss_value, info = self._step(x, y, epoch)
            seen += len(y)
            correct += int((logits.argmax(1) == y).sum())
            loss_sum += loss_value * len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", **info)
        metrics = evaluate(self.model, self.loaders, cfg.placement, not cfg.gated, self.reference_macs) if d.main else {}
        if self.controller is not None and not gates_frozen(self.sched.last_epoch / self.steps, cfg.freeze_gates):
            eval_fraction, train_fraction = cost_gap(self.model, self.loaders, cfg.placement) if d.main else (0.0, 0.0)
            self.controller.calibrate(d.broadcast(eval_fraction), d.broadcast(train_fraction))
            metrics["mac_fraction_train_images"] = {"eval": eval_fraction, "training": train_fraction}
        if self.exits is not None:
            metrics["exit_accuracy_held_out"] = exit_accuracies(score(self.exits, self.held, progress=False))
        if d.main:
            self._log_epoch(epoch, metrics, loss_sum / seen, correct / seen, time.time() - t0)
        d.barrier()
        return metrics

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> tuple[torch.Tensor, float, dict]:
        cfg, d, lc = self.cfg, self.d, self.lc
        progress = self.sched.last_epoch / self.steps
        frozen = gates_frozen(progress, cfg.freeze_gates)
        if frozen and self.controller is not None and self.landing is None:
            self._land()
        if lc is not None:
            noise = cfg.gate_noise * noise_factor(progress, cfg.budget_ramp, cfg.freeze_gates)
            set_gate_training(lc, noise, 0.0 if frozen else cfg.gate_input_momentum, cfg.per_image_loss == "importance")
        with torch.autocast(d.device.type, dtype=self.amp_dtype, enabled=cfg.amp):
            outs = self.exits.forward_exits(x) if self.exits is not None else [self.train_model(x)]
            logits = outs[-1]
            loss = F.cross_entropy(logits, y)
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                w = cfg.distill_weight
                loss = (1 - w) * loss + w * distill_loss(logits.float(), teacher_logits.float(), cfg.distill_temperature)
            if self.exits is not None:
                defaults = ExitsConfig  # the heads learn as lcsurgery exits train teaches them, from the network's own output
                loss = loss + cfg.exit_weight * heads_loss(outs[:-1], y, logits.detach(), defaults.distill_weight, defaults.distill_temperature)
        info: dict = {}
        if lc is not None:
            frac = d.mean(float(last_macs(lc).double().mean()) / static_costs(lc, tuple(x.shape[1:])).dense)
            strength = 0.0 if frozen else self.controller.update(frac, progress) if self.controller is not None else cfg.l1
            if strength:
                if cfg.penalty == "l1":
                    penalty = gate_l1(lc, cost_aware=cfg.cost_aware)
                else:
                    weights = difficulty_weights(logits if teacher_logits is None else teacher_logits, y, cfg.per_image_weight) if cfg.per_image_loss == "difficulty" else None
                    penalty = macs_penalty(lc, image_weights=weights)
                loss = loss + strength * penalty
            per_image = cfg.per_image_weight * (max(1.0 - progress / cfg.budget_ramp, 0.0) if cfg.per_image_loss == "shaping" else 1.0)
            extra = conditional_loss(lc, cfg.per_image_loss) if not frozen and per_image > 0 else None
            if extra is not None:
                loss = loss + per_image * extra
            info = {"macs": f"{frac:.3f}", "penalty": "frozen" if frozen else f"{strength:.3g}"}
        loss_value = d.mean(loss.item())  # the same on every rank, so all of them stop together
        if lc is not None and d.main and self.sched.last_epoch % STEP_LOG_EVERY == 0:
            with open(self.out / "steps.jsonl", "a") as f:
                f.write(json.dumps({"step": self.sched.last_epoch, "epoch": epoch + 1, "loss": loss_value, "mac_fraction": frac, "penalty_strength": strength}) + "\n")
        if not math.isfinite(loss_value):
            last = f"epoch {epoch}" if epoch else "nothing yet"
            raise LCSurgeryError(
                f"training diverged: the loss is {loss_value} at step {self.sched.last_epoch + 1} (epoch {epoch + 1}); "
                f"stopped instead of training on NaN. {self.out / 'last.pt'} holds {last}. Rerun with a lower --lr or --gate-lr "
                f"(see steps.jsonl for the loss and penalty strength before it)"
            )
        opts = [self.opt] if self.exits is None else [self.opt, self.head_opt]
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()
        self.sched.step()
        if self.exits is not None:
            self.head_sched.step()
        return logits, loss_value, info

    def _land(self) -> None:
        """When the gates stop learning: if eval would pay more than 2% off the budget on held-out
        training images, flip whole gates until it does not (rank 0 decides; the flipped biases
        reach every rank by broadcast, so the ranks stay identical)."""
        d = self.d
        if d.main:
            landing = land(self.model, first_images(self.loaders.calibration, d.device), self.cfg.budget, self.cfg.placement)
            self.landing = {"step": self.sched.last_epoch, **landing.as_dict()}
            if landing.closed or landing.opened:
                print(f"gates frozen at step {self.sched.last_epoch}: eval MACs on held-out training images {landing.before:.3f} of dense, "
                      f"{landing.after:.3f} after {'closing' if landing.closed else 'opening'} {landing.closed or landing.opened} gates")  # fmt: skip
        else:
            self.landing = {"step": self.sched.last_epoch}
        d.broadcast_gates(self.model)

    def _log_epoch(self, epoch: int, metrics: dict, train_loss: float, train_accuracy: float, seconds: float) -> None:
        cfg = self.cfg
        record = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_accuracy, **metrics, "lr": self.sched.get_last_lr()[0], "seconds": round(seconds, 1)}
        if self.lc is not None:
            record["gates_frozen"] = gates_frozen(self.sched.last_epoch / self.steps, cfg.freeze_gates)
        if self.controller is not None:
            record["penalty_strength"] = 0.0 if record["gates_frozen"] else self.controller.strength
            record["landing"] = self.landing
        with open(self.out / "log.jsonl", "a") as log:
            log.write(json.dumps(record) + "\n")
        state = {"epoch": epoch + 1, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "rng": torch.get_rng_state()}
        if self.controller is not None:
            state["controller"] = self.controller.state_dict()
            state["landing"] = self.landing
        if self.exits is not None:
            state.update(heads=self.exits.heads.state_dict(), heads_optimizer=self.head_opt.state_dict(), heads_scheduler=self.head_sched.state_dict())
        save(self.out / "last.pt", state)
        heads = f", held-out accuracy per exit {' '.join(f'{a:.3f}' for a in metrics['exit_accuracy_held_out'])}" if self.exits is not None else ""
        print(f"epoch {epoch + 1}: val accuracy {metrics['val_accuracy']:.4f}, MACs {metrics['mac_fraction']:.3f} of dense{heads}")

    def _exits_config(self) -> ExitsConfig:
        """The exits run ``OUT/exits`` this run makes: its heads on this run's network, held out as trained."""
        cfg = self.cfg
        return ExitsConfig(
            model=cfg.model, data=cfg.data, run=str(self.out), out=str(self.out / EXITS_FOLDER), at=tuple(cfg.exits), hidden=cfg.exit_hidden, epochs=cfg.epochs,
            batch_size=cfg.batch_size, lr=cfg.exit_lr, held_out=cfg.exit_held_out, size=cfg.size, test_subset=cfg.test_subset, seed=cfg.seed, joint=True,
        )  # fmt: skip

    def _write_exits(self) -> dict:
        """Write ``OUT/exits`` (config, heads with the network, the budget sweep); the summary for metrics.json."""
        ecfg = self._exits_config()
        out = Path(ecfg.out)
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(ecfg), indent=2))
        save(out / "model.pt", self.exits.state_dict())
        sweep = write_sweep(self.exits, ecfg, score(self.exits, self.held), score(self.exits, self.exit_test), self.loaders.classes, None)
        return {"run": str(out), "exit_accuracy": sweep["exit_accuracy"], "best_within_1_point": sweep["best_within_1_point"], "best_within_3_points": sweep["best_within_3_points"]}
