"""Loading checkpoints into original or converted models, with one clear error on mismatch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lcsurgery.errors import CheckpointMismatchError
from lcsurgery.surgery.model import GATE_PREFIX

_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadResult:
    """What ``load_weights`` did: gate tensors left at their initial value (original checkpoints),
    and classifier tensors kept fresh because the checkpoint has another number of classes."""

    missing_gates: list[str]
    reinitialised: list[str] = field(default_factory=list)


def read_state_dict(checkpoint: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A flat state dict from a path or mapping: unwraps ``{"state_dict": ...}`` and strips ``module.``."""
    sd = torch.load(checkpoint, map_location="cpu", weights_only=True) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    while isinstance(sd, Mapping) and not any(isinstance(v, Tensor) for v in sd.values()):
        inner = next((sd[k] for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)), None)
        if inner is None:
            break
        sd = inner
    if not isinstance(sd, Mapping):
        raise CheckpointMismatchError(f"checkpoint holds a {type(sd).__name__}, not a state dict")
    out = {}
    for k, v in sd.items():
        for prefix in _PREFIXES:
            if k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_weights(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Tensor], reinit_head: bool = False) -> LoadResult:
    """Load an original or converted checkpoint into ``model`` (original or converted).

    Gate tensors may be absent (an original checkpoint into a converted model); anything else
    missing, unexpected or of the wrong shape raises ``CheckpointMismatchError`` before any
    tensor is copied. With ``reinit_head=True`` the final classifier may differ in shape (an
    ImageNet checkpoint fine-tuned for 10 classes): it keeps its fresh initialisation.
    """
    sd = dict(read_state_dict(checkpoint))
    own = model.state_dict()
    reinitialised = []
    head = _classifier_prefix(model) if reinit_head else None
    if head is not None:
        for k in [k for k in own if k in sd and k.startswith(head) and sd[k].shape != own[k].shape]:
            del sd[k]
            reinitialised.append(k)
        sd.update({k: own[k] for k in reinitialised})
    missing = [k for k in own if k not in sd]
    missing_gates = [k for k in missing if k.startswith(GATE_PREFIX + ".")]
    # checkpoints from older PyTorch lack BatchNorm's step counter: bookkeeping, not weights
    missing_other = [k for k in missing if not k.startswith(GATE_PREFIX + ".") and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing_other or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing_other), ("unexpected", unexpected), ("with another shape", shapes)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise CheckpointMismatchError(
            f"checkpoint does not fit {type(model).__name__}: it was saved from another architecture or "
            f"configuration: {'; '.join(parts)}"
        )
    model.load_state_dict(sd, strict=False)
    return LoadResult(missing_gates, reinitialised)


def _classifier_prefix(model: nn.Module) -> str | None:
    """Path prefix (``fc.``) of the last Linear layer, taken to be the classifier."""
    last = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and not name.startswith(GATE_PREFIX + "."):
            last = name
    return f"{last}." if last else None
