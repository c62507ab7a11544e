"""Does leaving early become speed? The network with exits under a policy vs the same network
without them (gated, if it has gates), batch by batch, interleaved in one process.

Each round runs every batch of the images through both, alternating, so machine noise hits both
alike. It reports the median time per round of each, the mean MACs per image of each, and the
translation efficiency (time(no exits) / time(exits)) / (MACs(no exits) / MACs(exits)): 1 when
every MAC saved by leaving early is time saved. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lcsurgery.bench.threads import num_threads
from lcsurgery.exits.model import ExitModel
from lcsurgery.macs.dynamic import last_macs
from lcsurgery.surgery.model import LCModel


def time_exits(
    model: ExitModel, images: Tensor, rounds: int = 3, threads: int = 1, warmup: int = 20, batch: int = 1, device: torch.device | str = "cpu"
) -> dict:
    """Time ``model`` (its policy set) and its backbone alone on ``images`` in batches of ``batch``
    (the last batch may be smaller); on a GPU each call ends with a synchronize."""
    device = torch.device(device)
    model.eval().to(device)
    gated = isinstance(model.backbone, LCModel)
    batches = [b.to(device) for b in images.split(batch)]
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    dense_s, exit_s, macs, base = [], [], [], []
    with num_threads(threads), torch.inference_mode():
        for x in batches[: max(1, warmup // batch)]:
            model.backbone(x)
            model(x)
        sync()
        for r in tqdm(range(rounds), desc=f"timing exits at batch {batch}", leave=False):
            d = e = 0.0
            for x in batches:
                t0 = time.perf_counter()
                model.backbone(x)
                sync()
                t1 = time.perf_counter()
                model(x)
                sync()
                t2 = time.perf_counter()
                d, e = d + t1 - t0, e + t2 - t1
                if r == 0:
                    macs.append(model.last_macs.cpu())
                    if gated:
                        model.backbone(x)  # untimed: these images' own gated cost
                        base.append(last_macs(model.backbone).cpu())
            dense_s.append(d)
            exit_s.append(e)
    dense_time, exit_time = statistics.median(dense_s), statistics.median(exit_s)
    dense_macs = float(torch.cat(base).double().mean()) if gated else model.dense_macs(tuple(images.shape[1:]))
    exit_macs = float(torch.cat(macs).double().mean())
    return {
        "images": len(images), "batch": batch, "rounds": rounds, "threads": threads, "device": str(device),
        "no_exits_ms_per_image": 1e3 * dense_time / len(images), "exits_ms_per_image": 1e3 * exit_time / len(images),
        "no_exits_macs": dense_macs, "exits_macs": exit_macs, "speedup": dense_time / exit_time, "mac_ratio": dense_macs / exit_macs,
        "efficiency": (dense_time / exit_time) / (dense_macs / exit_macs), "no_exits_s_per_round": dense_s, "exits_s_per_round": exit_s,
    }  # fmt: skip
