"""Build a model from a spec string: ``torchvision:<name>``, ``timm:<name>``, ``cifar:<name>``
or ``path/to/file.py:factory``, optionally loading a checkpoint."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from torch import nn

from lcsurgery.errors import LCSurgeryError
from lcsurgery.models import cifar_resnet

CIFAR_MODELS = {"resnet20": cifar_resnet.resnet20, "resnet56": cifar_resnet.resnet56}
SPEC_HELP = "torchvision:<name>, timm:<name>, cifar:resnet20|resnet56, or path/to/file.py:factory"


def create_model(spec: str, num_classes: int | None = None, pretrained: bool = False) -> nn.Module:
    """The model named by ``spec`` (see ``SPEC_HELP``), with ``num_classes`` outputs when given."""
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise LCSurgeryError(f"unknown model spec {spec!r}: expected {SPEC_HELP}")
    kw = {} if num_classes is None else {"num_classes": num_classes}
    if kind == "cifar":
        if name not in CIFAR_MODELS:
            raise LCSurgeryError(f"unknown CIFAR model {name!r}: choose from {sorted(CIFAR_MODELS)}")
        return CIFAR_MODELS[name](**kw)
    if kind == "torchvision":
        import torchvision

        if name not in torchvision.models.list_models():
            raise LCSurgeryError(f"torchvision has no model {name!r} (see torchvision.models.list_models())")
        return torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    if kind == "timm":
        import timm

        if not timm.is_model(name):
            raise LCSurgeryError(f"timm has no model {name!r} (see timm.list_models())")
        return timm.create_model(name, pretrained=pretrained, **kw)
    if kind.endswith(".py"):
        return _from_file(Path(kind), name, kw)
    raise LCSurgeryError(f"unknown model spec {spec!r}: expected {SPEC_HELP}")


def _from_file(path: Path, factory: str, kw: dict) -> nn.Module:
    if not path.is_file():
        raise LCSurgeryError(f"model file {os.fspath(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"lcsurgery_user_model_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise LCSurgeryError(f"{path} defines no callable {factory!r}")
    model = fn(**kw)
    if not isinstance(model, nn.Module):
        raise LCSurgeryError(f"{path}:{factory} returned {type(model).__name__}, not an nn.Module")
    return model
