"""Does leaving early become speed? The network with exits under a policy vs the same network
without them (gated, if it has gates), image by image at batch 1, interleaved in one process.

Each round runs every image through both, alternating, so machine noise hits both alike. It
reports the total time of each over the images, the MACs of each, and the translation
efficiency (time(no exits) / time(exits)) / (MACs(no exits) / MACs(exits)): 1 when every MAC
saved by leaving early is time saved. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lcsurgery.exits.model import ExitModel
from lcsurgery.macs.dynamic import last_macs
from lcsurgery.surgery.model import LCModel


def time_exits(model: ExitModel, images: Tensor, rounds: int = 3, threads: int = 1, warmup: int = 20) -> dict:
    """Time ``model`` (its policy set) and its backbone alone on each of ``images`` at batch 1."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    model.eval()
    gated = isinstance(model.backbone, LCModel)
    dense_s, exit_s, macs, base = [], [], [], []
    try:
        with torch.inference_mode():
            for x in images[:warmup]:
                model.backbone(x[None])
                model(x[None])
            for _ in tqdm(range(rounds), desc="timing exits at batch 1", leave=False):
                d = e = 0.0
                for x in images:
                    x = x[None]
                    t0 = time.perf_counter()
                    model.backbone(x)
                    t1 = time.perf_counter()
                    model(x)
                    t2 = time.perf_counter()
                    d, e = d + t1 - t0, e + t2 - t1
                    macs.append(int(model.last_macs[0]))
                    if gated:
                        model.backbone(x)  # untimed: this image's own gated cost
                        base.append(int(last_macs(model.backbone)[0]))
                dense_s.append(d)
                exit_s.append(e)
    finally:
        torch.set_num_threads(previous)
    dense_time, exit_time = statistics.median(dense_s), statistics.median(exit_s)
    dense_macs = statistics.fmean(base) if gated else model.dense_macs(tuple(images.shape[1:]))
    exit_macs = statistics.fmean(macs)
    return {
        "images": len(images), "rounds": rounds, "threads": threads, "no_exits_ms_per_image": 1e3 * dense_time / len(images),
        "exits_ms_per_image": 1e3 * exit_time / len(images), "speedup": dense_time / exit_time, "mac_ratio": dense_macs / exit_macs,
        "efficiency": (dense_time / exit_time) / (dense_macs / exit_macs), "no_exits_s_per_round": dense_s, "exits_s_per_round": exit_s,
    }  # fmt: skip
