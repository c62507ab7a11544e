"""Kernel ceiling: how much of a channel cut does the backend's conv kernel turn into time?

Skipping a block saves its whole branch, but cutting channels saves only what the conv kernel
gives back when it computes fewer filters or reads fewer input channels. This times every
distinct conv of a model at its real input shape: in full, with half its filters (what the
sequential placement does to a block's first conv) and with half its input channels (what both
placements do to the next conv). Each cut's efficiency is (time full / time cut) / (MACs full /
MACs cut): 1 when the kernel saves time in proportion. The engine cannot beat these numbers on
the channel part of its savings, so they say whether a low efficiency in ``bench latency`` is
the engine's overhead or the kernel's. Prints a table and writes JSON; not a test.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lcsurgery.bench.latency import MODELS, cpu_name, time_round_robin
from lcsurgery.models.factory import create_model


@dataclass(frozen=True)
class ConvShape:
    """A dense (ungrouped) conv as the model calls it, at batch 1."""

    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    height: int
    width: int


@dataclass
class KernelRow:
    """Median times (microseconds) of one conv shape in full and cut by half two ways."""

    model: str
    batch: int
    shape: ConvShape
    convs: list[str] = field(default_factory=list)  # the model's convs with this shape
    full_us: float = 0.0
    half_filters_us: float = 0.0
    half_inputs_us: float = 0.0
    filters_efficiency: float = 0.0
    inputs_efficiency: float = 0.0


def conv_shapes(model: nn.Module, input_size: tuple[int, int, int]) -> dict[ConvShape, list[str]]:
    """Every distinct ungrouped ``nn.Conv2d`` call of ``model`` on one input, with the convs that have it."""
    found: dict[ConvShape, list[str]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and not isinstance(m.padding, str):

            def hook(mod: nn.Conv2d, args: tuple, out: torch.Tensor, name: str = name) -> None:
                h, w = args[0].shape[-2:]
                shape = ConvShape(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, h, w)
                found.setdefault(shape, []).append(name)

            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in hooks:
            h.remove()
    return found


def time_shape(shape: ConvShape, batch: int, rounds: int, warmup: int) -> tuple[float, float, float]:
    """Median microseconds of the conv in full, with half its filters, and reading half its inputs."""
    x = torch.randn(batch, shape.in_channels, shape.height, shape.width)
    w = torch.randn(shape.out_channels, shape.in_channels, *shape.kernel)
    b = torch.randn(shape.out_channels)
    half_out, half_in = max(1, shape.out_channels // 2), max(1, shape.in_channels // 2)
    x_in = x[:, :half_in].contiguous()
    w_out, w_in = w[:half_out].contiguous(), w[:, :half_in].contiguous()
    s, p = shape.stride, shape.padding
    with torch.no_grad():
        samples = time_round_robin(
            {
                "full": lambda: F.conv2d(x, w, b, s, p),
                "filters": lambda: F.conv2d(x, w_out, b[:half_out], s, p),
                "inputs": lambda: F.conv2d(x_in, w_in, b, s, p),
            },
            rounds,
            warmup,
            budget_s=10.0,
        )
    full, filters, inputs = (statistics.median(samples[k]) * 1e6 for k in ("full", "filters", "inputs"))
    return full, filters, inputs


def bench_model(spec: str, size: int, batches: list[int], rounds: int, warmup: int) -> list[KernelRow]:
    shapes = conv_shapes(create_model(spec), (3, size, size))
    rows = []
    for batch in batches:
        for shape, convs in tqdm(shapes.items(), desc=f"{spec} batch {batch}", leave=False):
            full, filters, inputs = time_shape(shape, batch, rounds, warmup)
            row = KernelRow(spec, batch, shape, convs, full, filters, inputs)
            row.filters_efficiency = (full / filters) / (shape.out_channels / max(1, shape.out_channels // 2))
            row.inputs_efficiency = (full / inputs) / (shape.in_channels / max(1, shape.in_channels // 2))
            rows.append(row)
    return rows


def format_table(rows: list[KernelRow]) -> str:
    head = ("model", "batch", "conv (in>out kxk /s @HxW)", "used", "full us", "half filters us", "eff", "half inputs us", "eff")
    lines = []
    for r in rows:
        s = r.shape
        conv = f"{s.in_channels}>{s.out_channels} {s.kernel[0]}x{s.kernel[1]} /{s.stride[0]} @{s.height}x{s.width}"
        lines.append((
            r.model, str(r.batch), conv, str(len(r.convs)), f"{r.full_us:.1f}", f"{r.half_filters_us:.1f}",
            f"{r.filters_efficiency:.2f}", f"{r.half_inputs_us:.1f}", f"{r.inputs_efficiency:.2f}",
        ))  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 3 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in lines])


def run(models: list[str], batches: list[int], threads: int, rounds: int, warmup: int, out: Path) -> list[KernelRow]:
    """The benchmark: one table per model, all rows in one JSON file."""
    torch.set_num_threads(threads)
    rows: list[KernelRow] = []
    for spec in tqdm(models, desc="models"):
        new = bench_model(spec, MODELS.get(spec, 224), batches, rounds, warmup)
        print(format_table(new), flush=True)
        rows += new
    meta = {"date": time.strftime("%Y-%m-%d"), "threads": threads, "torch": torch.__version__, "cpu": cpu_name(), "rounds": rounds}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    return rows
