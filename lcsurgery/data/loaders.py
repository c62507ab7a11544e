"""Batch loaders: normalisation taken from the model, standard CIFAR augmentation, seeded per epoch.

``ArrayLoader`` augments whole uint8 batches in memory (random 4-pixel-padded crop, horizontal
flip), which on a CPU is several times faster than per-image PIL transforms. The order and the
augmentation of epoch ``e`` depend only on ``(seed, e)``, so a run resumed at an epoch boundary
sees exactly the batches it would have seen; with ``world > 1`` each rank takes a disjoint shard.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcsurgery.data.arrays import ArrayDataset
from lcsurgery.data.sources import is_small_tree, load_arrays
from lcsurgery.errors import LCSurgeryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the model expects: timm's ``pretrained_cfg``, a model's own ``mean``/``std``, else ImageNet's."""
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("mean") and cfg.get("std"):
        return tuple(cfg["mean"]), tuple(cfg["std"])
    if hasattr(model, "mean") and hasattr(model, "std") and not callable(model.mean):
        return tuple(model.mean), tuple(model.std)
    return IMAGENET_MEAN, IMAGENET_STD


class ArrayLoader:
    """Normalised float batches (x [B, 3, H, W], y [B]) from an in-memory uint8 dataset."""

    def __init__(
        self,
        data: ArrayDataset,
        batch_size: int,
        *,
        train: bool,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        size: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        augment: bool = True,
    ) -> None:
        self.data, self.batch_size, self.train, self.augment = data, batch_size, train, augment
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        if self.train:
            return n // (self.batch_size * self.world)
        return -(-len(range(self.rank, n, self.world)) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b, aug in self._batches():
            x = self.data.images[b]
            if aug is not None and self.augment:
                x = _augment(x, *aug)
            x = (x.float() - self.mean) / self.std
            if self.size is not None and x.shape[-1] != self.size:
                x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
            yield x, self.data.labels[b]

    def _batches(self) -> Iterator[tuple[Tensor, tuple[Tensor, Tensor, Tensor] | None]]:
        """Indices (and augmentation draws) of this rank's batches.

        Training draws the order and the augmentation of each *global* batch (all ranks
        together) from the epoch's seed and gives each rank its slice, so ``world`` ranks of
        batch ``B`` see exactly what one process of batch ``world * B`` sees.
        """
        n = len(self.data)
        if not self.train:
            idx = torch.arange(self.rank, n, self.world)
            for start in range(0, len(idx), self.batch_size):
                yield idx[start : start + self.batch_size], None
            return
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=gen)
        g = self.batch_size * self.world
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step in range(n // g):
            draws = _augment_draws(g, self.data.images.shape[-2:], gen)
            yield order[step * g : (step + 1) * g][mine], tuple(d[mine] for d in draws)


def _augment_draws(n: int, hw: tuple[int, int], gen: torch.Generator, pad: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    """Crop offsets and flips for ``n`` images: the randomness of ``_augment``."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return dy, dx, torch.rand(n, generator=gen) < 0.5


def _augment(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, pad: int = 4) -> Tensor:
    """Crop at (dy, dx) from a zero-padded image, then flip where asked, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


@dataclass
class Loaders:
    """Train and test loaders for one dataset spec, with the class names.

    ``calibration`` yields shuffled training images with the test transform: what eval-mode cost
    looks like on data the model trained on (augmentation such as zero-padded crops changes it).
    """

    train: ArrayLoader | torch.utils.data.DataLoader
    test: ArrayLoader | torch.utils.data.DataLoader
    classes: list[str]
    calibration: ArrayLoader | torch.utils.data.DataLoader


def make_loaders(
    spec: str,
    model: nn.Module,
    batch_size: int,
    *,
    size: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world: int = 1,
    train_subset: int | None = None,
    test_subset: int | None = None,
    workers: int = 2,
    held_out: int | None = None,
) -> Loaders:
    """Loaders for ``spec`` (see ``lcsurgery.data.sources``), normalised as ``model`` expects.

    ``size`` resizes inputs (e.g. CIFAR at 64 px for an ImageNet model); large-image trees are
    cropped to it (default: the model's configured input size, else 224). ``held_out`` training
    images (the split ``ArrayDataset.split`` makes) are left out of training, before ``train_subset``.
    """
    mean, std = normalization(model)
    path = Path(spec)
    if path.is_dir() and not is_small_tree(path):
        if held_out:
            raise LCSurgeryError(f"{spec} is an ImageFolder tree streamed from disk: holding out training images needs a dataset loaded as arrays (a .tar.gz, cifar10:<dir> or a small tree)")
        return _image_folder_loaders(path, batch_size, mean, std, size or _model_size(model), rank, world, workers)
    train = load_arrays(spec, "train")
    train = (train.split(held_out)[0] if held_out else train).subset(train_subset)
    test = load_arrays(spec, "test").subset(test_subset)
    common = dict(mean=mean, std=std, size=size, seed=seed, rank=rank, world=world)
    return Loaders(
        ArrayLoader(train, batch_size, train=True, **common),
        ArrayLoader(test, batch_size, train=False, **common),
        train.classes,
        ArrayLoader(train, batch_size, train=True, augment=False, **{**common, "rank": 0, "world": 1}),
    )


def _model_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    return 224


def _image_folder_loaders(root: Path, batch_size: int, mean, std, size: int, rank: int, world: int, workers: int) -> Loaders:
    """Lazy ImageFolder loaders for trees of large images (ImageNet-style), standard transforms."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision.datasets import ImageFolder

    from lcsurgery.data.sources import _tree_split

    norm = T.Normalize(mean, std)
    train = ImageFolder(_tree_split(root, "train"), T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm]))
    plain = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), norm])
    test = ImageFolder(_tree_split(root, "test"), plain)
    calibration = copy.copy(train)  # the same file list (no second scan of the tree), the test transform
    calibration.transform = plain
    sampler = DistributedSampler(train, world, rank) if world > 1 else None
    return Loaders(
        DataLoader(train, batch_size, shuffle=sampler is None, sampler=sampler, num_workers=workers, drop_last=True),
        DataLoader(test, batch_size, sampler=DistributedSampler(test, world, rank, shuffle=False) if world > 1 else None, num_workers=workers),
        train.classes,
        DataLoader(calibration, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0), num_workers=workers),
    )
