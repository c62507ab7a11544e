"""Data sources and loaders: decoding, caching, augmentation, determinism, sharding."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import lcsurgery
from lcsurgery.data.loaders import ArrayLoader, _augment, _augment_draws, make_loaders, normalization
from lcsurgery.data.arrays import ArrayDataset
from lcsurgery.data.sources import load_arrays
from lcsurgery.data.synthetic import CLASSES, make_synthetic
from lcsurgery.models.cifar_resnet import resnet20


def _png(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LCSURGERY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tiny_tar(tmp_path):
    """An ImageFolder tarball under a prefix: classes 'blue' and 'red', train and test splits."""
    path = tmp_path / "tiny.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for split, n in (("train", 3), ("test", 2)):
            for cls, color in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
                for i in range(n):
                    blob = _png(color)
                    info = tarfile.TarInfo(f"data/{split}/{cls}/{i:04d}.png")
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
    return path


def test_tarball_imagefolder_is_decoded_and_cached(tiny_tar, cache):
    train = load_arrays(str(tiny_tar), "train")
    assert train.classes == ["blue", "red"] and train.images.shape == (6, 3, 8, 8)
    assert train.images.dtype == torch.uint8
    for img, label in zip(train.images, train.labels, strict=True):
        expect = torch.tensor([0, 0, 255] if label == 0 else [255, 0, 0], dtype=torch.uint8)
        assert torch.equal(img[:, 0, 0], expect)
    assert len(list(cache.glob("*.pt"))) == 2
    tiny_tar.with_name("gone").write_bytes(b"")
    test = load_arrays(str(tiny_tar), "test")
    assert len(test) == 4 and torch.equal(test.labels.sort().values, torch.tensor([0, 0, 1, 1]))


def test_a_half_written_cache_is_decoded_again_and_rewritten(tiny_tar, cache, capsys):
    first = load_arrays(str(tiny_tar), "train")
    (broken,) = [p for p in cache.glob("*.pt") if "-train-" in p.name]
    broken.write_bytes(broken.read_bytes()[:100])  # what a run killed while writing it used to leave
    again = load_arrays(str(tiny_tar), "train")
    assert "unreadable" in capsys.readouterr().err
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)
    assert torch.equal(torch.load(broken, weights_only=True)["images"], first.images)
    assert not list(cache.glob("*.tmp"))


def test_imagefolder_tree(tmp_path, cache):
    for split in ("train", "val"):
        for cls, color in (("cat", (10, 20, 30)), ("dog", (200, 100, 0))):
            (tmp_path / "tree" / split / cls).mkdir(parents=True)
            (tmp_path / "tree" / split / cls / "a.png").write_bytes(_png(color))
    ds = load_arrays(str(tmp_path / "tree"), "test")
    assert ds.classes == ["cat", "dog"] and ds.images.shape == (2, 3, 8, 8)


def test_bad_data_paths(tmp_path, cache):
    with pytest.raises(lcsurgery.LCSurgeryError, match="does not exist"):
        load_arrays(str(tmp_path / "nowhere.tar.gz"), "train")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(_png((1, 2, 3)))
    with pytest.raises(lcsurgery.LCSurgeryError, match="no train/ folder"):
        load_arrays(str(tmp_path / "flat"), "train")
    with pytest.raises(lcsurgery.LCSurgeryError, match="no CIFAR-10 download folder"):
        load_arrays(f"cifar10:{tmp_path}", "train")


def test_synthetic_task_is_deterministic_and_balanced():
    a, b = make_synthetic(200, seed=3), make_synthetic(200, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, make_synthetic(200, seed=4).images)
    assert torch.equal(torch.bincount(a.labels), torch.full((10,), 20)) and a.classes == CLASSES


def test_augmentation_is_a_padded_crop_or_its_mirror():
    x = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    out = _augment(x, *_augment_draws(64, (8, 8), torch.Generator().manual_seed(0)))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i in range(len(x)):
        crops = [padded[i, :, dy : dy + 8, dx : dx + 8] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_loader_epochs_are_reproducible_and_shards_disjoint():
    data = make_synthetic(100, seed=0)
    kw = dict(train=True, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=1)
    first = [y for _, y in ArrayLoader(data, 10, **kw)]
    loader = ArrayLoader(data, 10, **kw)
    assert all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader], strict=True))
    loader.set_epoch(1)
    assert not all(torch.equal(a, b) for a, b in zip(first, [y for _, y in loader], strict=True))
    # images that encode their index (value index + 1; padding is 0): shards must not overlap
    indexed = ArrayDataset(torch.arange(1, 101, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 8, 8).contiguous(), data.labels, data.classes)
    raw = dict(train=True, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255), seed=1)
    shards = [ArrayLoader(indexed, 10, rank=r, world=2, **raw) for r in range(2)]
    seen = [{int(x.max()) for xb, _ in s for x in xb} for s in shards]
    assert len(shards[0]) == len(shards[1]) == 5
    assert len(seen[0]) == len(seen[1]) == 50 and not seen[0] & seen[1]
    # together, the ranks' batches are the single-process global batches, augmentation included
    single = ArrayLoader(indexed, 20, **{**raw, "world": 1})
    for (x0, _), (x1, _), (xs, _) in zip(*shards, single, strict=True):
        assert torch.equal(torch.cat([x0, x1]), xs)


def test_normalisation_comes_from_the_model():
    import timm

    assert normalization(resnet20()) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    inception = timm.create_model("inception_v3")
    assert normalization(inception) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    loaders = make_loaders("synthetic:200", inception, 50, size=48)
    x, y = next(iter(loaders.test))
    assert x.shape == (50, 3, 48, 48) and y.shape == (50,)
    raw = loaders.test.data.images[:50].float() / 255
    assert torch.allclose(torch.nn.functional.interpolate((raw - 0.5) / 0.5, size=(48, 48), mode="bilinear", antialias=True), x, atol=1e-5)


def test_subset_is_class_balanced():
    ds = ArrayDataset(torch.zeros(30, 3, 2, 2, dtype=torch.uint8), torch.tensor([0] * 20 + [1] * 10), ["a", "b"])
    assert torch.equal(torch.bincount(ds.subset(10).labels), torch.tensor([5, 5]))


def test_held_out_training_images_never_reach_training_and_subsets_come_after(tmp_path, cache):
    full = load_arrays("synthetic:600", "train")
    rest, held = full.split(100)
    loaders = make_loaders("synthetic:600", resnet20(), 50, held_out=100)
    assert torch.equal(loaders.train.data.images, rest.images) and torch.equal(loaders.calibration.data.images, rest.images)
    assert not (loaders.train.data.images.flatten(1)[:, None] == held.images.flatten(1)[None]).all(2).any()
    assert len(make_loaders("synthetic:600", resnet20(), 50, held_out=100, train_subset=200).train.data) == 200
    for split in ("train", "val"):
        (tmp_path / "big" / split / "cat").mkdir(parents=True)
        Image.new("RGB", (300, 300)).save(tmp_path / "big" / split / "cat" / "a.png")
    with pytest.raises(lcsurgery.LCSurgeryError, match="holding out training images needs a dataset loaded as arrays"):
        make_loaders(str(tmp_path / "big"), resnet20(), 50, held_out=100)


def test_shared_cifar_and_pretrained_resnet20(shared):
    train = load_arrays(str(shared / "data" / "cifar10-jpg.tar.gz"), "train")
    assert train.images.shape == (50000, 3, 32, 32) and torch.equal(torch.bincount(train.labels), torch.full((10,), 5000))
    model = resnet20().eval()
    lcsurgery.load_weights(model, shared / "models" / "cifar10-resnet20.th")
    test = make_loaders(str(shared / "data" / "cifar10-jpg.tar.gz"), model, 500, test_subset=2000).test
    with torch.no_grad():
        acc = np.mean([float((model(x).argmax(1) == y).float().mean()) for x, y in test])
    assert 0.77 < acc < 0.85  # the shared README: 81.0% on the JPEG test set before fine-tuning
