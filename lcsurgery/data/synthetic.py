"""The built-in offline task: ten shape classes at 32x32 whose difficulty varies per image.

Each image shows one shape (the label) at a random place, size and colour. A per-image
difficulty in [0, 1] shrinks the shape, lowers its contrast, and adds clutter strokes and
noise, so some images are easy and some are hard: a dynamic network has a reason to spend
different compute on different images. Generated deterministically from a seed, in seconds.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from lcsurgery.data.arrays import ArrayDataset

CLASSES = ["disc", "ring", "square", "frame", "triangle", "plus", "cross", "hstripes", "vstripes", "diamond"]
SIZE = 32


def _draw_shape(draw: ImageDraw.ImageDraw, label: int, cx: float, cy: float, r: float, color: tuple, width: int) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if label == 0:
        draw.ellipse(box, fill=color)
    elif label == 1:
        draw.ellipse(box, outline=color, width=width)
    elif label == 2:
        draw.rectangle(box, fill=color)
    elif label == 3:
        draw.rectangle(box, outline=color, width=width)
    elif label == 4:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    elif label == 5:
        draw.line((cx - r, cy, cx + r, cy), fill=color, width=width)
        draw.line((cx, cy - r, cx, cy + r), fill=color, width=width)
    elif label == 6:
        draw.line((cx - r, cy - r, cx + r, cy + r), fill=color, width=width)
        draw.line((cx - r, cy + r, cx + r, cy - r), fill=color, width=width)
    elif label in (7, 8):
        step = max(2 * width, 3)
        for k in range(-int(r), int(r) + 1, step):
            seg = (cx - r, cy + k, cx + r, cy + k) if label == 7 else (cx + k, cy - r, cx + k, cy + r)
            draw.line(seg, fill=color, width=width)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)


@functools.lru_cache(maxsize=4)
def make_synthetic(n: int, seed: int = 0) -> ArrayDataset:
    """``n`` images, classes balanced, difficulty uniform in [0, 1]."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    difficulty = rng.uniform(0, 1, n)
    images = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        d = difficulty[i]
        bg = rng.uniform(40, 215, 3)
        direction = rng.normal(size=3)
        fg = np.clip(bg + (1.0 - 0.75 * d) * 110 * direction / np.linalg.norm(direction), 0, 255)
        im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in bg))
        draw = ImageDraw.Draw(im)
        for _ in range(int(round(8 * d))):  # clutter strokes in colours near the shape's
            a, b = rng.uniform(0, SIZE, 2), rng.uniform(0, SIZE, 2)
            tone = np.clip(bg + rng.uniform(0.3, 0.9) * (fg - bg) + rng.normal(0, 15, 3), 0, 255)
            draw.line((*a, *b), fill=tuple(int(v) for v in tone), width=int(rng.integers(1, 3)))
        r = rng.uniform(11, 14) - 6 * d
        cx, cy = rng.uniform(r + 1, SIZE - r - 1, 2)
        _draw_shape(draw, int(labels[i]), cx, cy, r, tuple(int(v) for v in fg), width=max(1, int(math.ceil(r / 5))))
        noisy = np.asarray(im, dtype=np.float32) + rng.normal(0, 4 + 36 * d, (SIZE, SIZE, 3))
        images[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return ArrayDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(), list(CLASSES))
