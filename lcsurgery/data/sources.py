"""Image datasets from a spec string, small ones decoded once into uint8 tensors and cached.

Specs:
- ``synthetic`` (or ``synthetic:<n_train>``): the built-in offline task (``lcsurgery.data.synthetic``).
- ``path/to/data.tar.gz``: an ImageFolder packed as a tarball, ``[prefix/]train|test|val/<class>/<image>``
  (the layout of ``../shared/data/cifar10-jpg.tar.gz``).
- ``path/to/dir`` holding ``train/`` and ``test/`` (or ``val/``) ImageFolder trees.
- ``cifar10:path/to/dir``: torchvision's CIFAR-10 download folder (``cifar-10-batches-py``);
  ``cifar10+download:dir`` downloads it first where the network allows.

Decoding 60,000 JPEGs takes ~20 s on one core, so arrays are cached under
``$LCSURGERY_CACHE`` (default ``~/.cache/lcsurgery``), keyed by the file's path, size and mtime.
Trees of large images (ImageNet) are not decoded up front: they stay lazy ``ImageFolder``s.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from lcsurgery.data.arrays import ArrayDataset
from lcsurgery.data.synthetic import make_synthetic
from lcsurgery.errors import LCSurgeryError

SPLIT_NAMES = {"train": ("train",), "test": ("test", "val", "validation")}
_IMAGE_EXT = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_SMALL = 64  # images up to this size are decoded into memory


def cache_dir() -> Path:
    return Path(os.environ.get("LCSURGERY_CACHE", Path.home() / ".cache" / "lcsurgery"))


def _cache_path(source: Path, split: str) -> Path:
    st = source.stat()
    key = hashlib.sha1(f"{source.resolve()}|{st.st_size}|{int(st.st_mtime)}|{split}|v1".encode()).hexdigest()[:16]
    return cache_dir() / f"{source.name}-{split}-{key}.pt"


def _decode(blob: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(blob)) as im:
        return np.asarray(im.convert("RGB"))


def _split_of(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, class) for a member path ``[prefix/]split/class/file``."""
    for i in range(len(parts) - 2):
        for split, names in SPLIT_NAMES.items():
            if parts[i].lower() in names and i + 3 == len(parts):
                return split, parts[i + 1]
    return None


def _stack(arrays: list[np.ndarray], labels: list[int], classes: list[str], what: str) -> ArrayDataset:
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise LCSurgeryError(f"{what}: images have different sizes {sorted(shapes)[:3]}; resize them to one size first")
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ArrayDataset(images, torch.tensor(labels, dtype=torch.int64), classes)


def _read_tar(path: Path) -> dict[str, ArrayDataset]:
    members: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(path) as tar:
        for m in tqdm(tar, desc=f"reading {path.name}", unit=" files", leave=False):
            if not m.isfile() or not m.name.lower().endswith(_IMAGE_EXT):
                continue
            where = _split_of(Path(m.name).parts)
            if where is not None:
                members[where[0]].append((where[1], tar.extractfile(m).read()))
    if not members["train"] or not members["test"]:
        raise LCSurgeryError(f"{path} is not an ImageFolder tarball: expected [prefix/]train/<class>/<image> and test/<class>/<image>")
    classes = sorted({c for c, _ in members["train"]})
    out = {}
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for split, items in members.items():
            items.sort(key=lambda t: t[0])
            arrays = list(tqdm(pool.map(_decode, [b for _, b in items], chunksize=512), total=len(items), desc=f"decoding {split}", leave=False))
            unknown = {c for c, _ in items} - set(classes)
            if unknown:
                raise LCSurgeryError(f"{path}: {split} has classes missing from train: {sorted(unknown)}")
            out[split] = _stack(arrays, [classes.index(c) for c, _ in items], classes, str(path))
    return out


def _tree_split(root: Path, split: str) -> Path:
    for name in SPLIT_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    raise LCSurgeryError(f"{root} has no {' or '.join(SPLIT_NAMES[split])}/ folder (expected an ImageFolder tree)")


def _first_image(folder: Path) -> Path:
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in _IMAGE_EXT:
            return p
    raise LCSurgeryError(f"{folder} holds no images")


def _read_tree(root: Path, split: str) -> ArrayDataset:
    folder = _tree_split(root, split)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [(i, p) for i, c in enumerate(classes) for p in sorted((folder / c).iterdir()) if p.suffix.lower() in _IMAGE_EXT]
    with ProcessPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        arrays = list(tqdm(pool.map(_decode, [p.read_bytes() for _, p in files], chunksize=512), total=len(files), desc=f"decoding {split}", leave=False))
    return _stack(arrays, [i for i, _ in files], classes, str(folder))


def _read_cifar10(root: Path, split: str, download: bool) -> ArrayDataset:
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download)
    except RuntimeError as exc:
        raise LCSurgeryError(f"no CIFAR-10 download folder at {root} ({exc}); use cifar10+download:{root} to fetch it") from exc
    return ArrayDataset(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets), list(ds.classes))


def dataset_classes(spec: str) -> list[str]:
    """Class names of a dataset spec (for sizing a model's classifier)."""
    path = Path(spec)
    if path.is_dir() and not (path / "cifar-10-batches-py").exists() and not is_small_tree(path):
        folder = _tree_split(path, "train")
        return sorted(d.name for d in folder.iterdir() if d.is_dir())
    return load_arrays(spec, "train").classes


def is_small_tree(root: Path) -> bool:
    with Image.open(_first_image(_tree_split(root, "train"))) as im:
        return max(im.size) <= _SMALL


def load_arrays(spec: str, split: str) -> ArrayDataset:
    """A decoded split (``"train"`` or ``"test"``) of a small-image dataset spec, cached after the first call."""
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        n = int(spec.partition(":")[2] or 10_000)
        return make_synthetic(n if split == "train" else max(n // 5, 100), seed=0 if split == "train" else 1)
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("cifar10", "cifar10+download"):
        return _read_cifar10(Path(rest), split, download=kind == "cifar10+download")
    path = Path(spec)
    if not path.exists():
        raise LCSurgeryError(f"data path {spec!r} does not exist (expected a .tar.gz, an ImageFolder tree, cifar10:<dir> or synthetic)")
    cached = _cache_path(path, split)
    if cached.exists():
        try:
            blob = torch.load(cached, weights_only=True)
            return ArrayDataset(blob["images"], blob["labels"], list(blob["classes"]))
        except (RuntimeError, EOFError, KeyError, OSError):  # unreadable (e.g. written by an older, interrupted version): decode again
            print(f"warning: the decoded-image cache {cached} is unreadable; decoding {spec} again", file=sys.stderr)
    if path.is_file():
        splits = _read_tar(path)
    else:
        splits = {s: _read_tree(path, s) for s in SPLIT_NAMES}
    cache_dir().mkdir(parents=True, exist_ok=True)
    for s, ds in splits.items():
        _save_atomically({"images": ds.images, "labels": ds.labels, "classes": ds.classes}, _cache_path(path, s))
    return splits[split]


def _save_atomically(obj: dict, target: Path) -> None:
    """Save to a temporary file beside ``target``, then rename: a run killed while writing the
    cache leaves no half-written file that later runs would fail to read."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
