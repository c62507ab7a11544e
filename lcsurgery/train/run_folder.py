"""A run folder: what a fine-tuning run writes, how it is resumed, and how its model is loaded back.

``config.json`` (the run's identity), ``log.jsonl`` (one line per epoch), ``steps.jsonl``
(controller trace), ``last.pt`` (everything needed to resume after a kill), ``model.pt``
(weights only, no pickled code), ``metrics.json``, for a pruned baseline ``structure.json``, and
for a run with exits ``exits/`` (an exits run on this run's network). Nothing is overwritten without ``force``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.train.build import build_model
from lcsurgery.train.config import FinetuneConfig

STRUCTURE_FILE = "structure.json"  # a pruned run's channel counts, to rebuild its model
EXITS_FOLDER = "exits"  # the exits run a finetune --exits run makes inside its folder
RUN_FILES = ("config.json", "log.jsonl", "steps.jsonl", "last.pt", "model.pt", "metrics.json", STRUCTURE_FILE)


def prepare_out(cfg: FinetuneConfig) -> Path:
    """The run folder, made (or, resuming, checked against the saved configuration) and holding ``config.json``."""
    out = Path(cfg.out)
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if cfg.resume:
        if not (out / "last.pt").exists():
            raise LCSurgeryError(f"nothing to resume in {out}: no last.pt (start the run without --resume)")
        saved = json.loads((out / "config.json").read_text())
        fields = FinetuneConfig.__dataclass_fields__
        diff = {k: (saved.get(k, fields[k].default), v) for k, v in cfg.identity().items() if saved.get(k, fields[k].default) != v}  # options added since default
        if diff:
            detail = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise LCSurgeryError(f"cannot resume {out} with a different configuration ({detail}); use another --out or the same options")
        return out
    if existing and not cfg.force:
        raise LCSurgeryError(f"{out} already holds a run ({', '.join(existing)}): pass --force to overwrite it or --resume to continue it")
    if existing:
        for f in existing:
            (out / f).unlink()
        shutil.rmtree(out / EXITS_FOLDER, ignore_errors=True)  # the exits of the run being overwritten
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.identity(), indent=2))
    return out


def save(path: Path, obj: dict) -> None:
    """``torch.save`` through a temporary file, so a kill mid-write never leaves a truncated checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a kill mid-write never leaves a truncated checkpoint


def load_run(run: Path) -> tuple[nn.Module, FinetuneConfig, int]:
    """The trained model of a ``lcsurgery finetune`` run folder, its config and its number of classes."""
    if not (run / "model.pt").exists():
        raise LCSurgeryError(f"{run} holds no finished run (model.pt missing): run lcsurgery finetune first")
    saved = json.loads((run / "config.json").read_text())
    cfg = FinetuneConfig(**{k: v for k, v in saved.items() if k in FinetuneConfig.__dataclass_fields__}, out=str(run))
    state = torch.load(run / "model.pt", map_location="cpu", weights_only=True)
    head = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2 and not k.startswith("lc_gates.")]
    classes = head[-1].shape[0]
    structure = json.loads((run / STRUCTURE_FILE).read_text()) if (run / STRUCTURE_FILE).exists() else None
    model = build_model(FinetuneConfig(**{**asdict(cfg), "checkpoint": None, "pretrained": False}), classes, structure)
    load_weights(model, state)  # runs saved before the gates' input statistics existed load with the identity statistics
    return model.eval(), cfg, classes
