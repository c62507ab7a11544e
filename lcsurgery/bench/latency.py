"""Latency benchmark: does skipping become speed? Dense vs converted, interleaved, one process.

For each model, batch size and placement it times, round-robin within one process so machine
noise hits every variant alike: the original model, the converted model with every gate open,
and the converted model with gates forced to fixed patterns (blocks skipped, half the channels
of the rest) or trained gates from a run folder. It reports medians and

- the cost of open gates: time(open) / time(original) - 1, and
- the translation efficiency of skipping: (time(open) / time(gated)) / (MACs(open) / MACs(gated)),
  which is 1 when every MAC saved is time saved, and
- the kernel-bound efficiency: the same ratio for the variant's conv and matrix kernels replayed
  alone (``lcsurgery.bench.floor``), the most any engine on this backend's kernels could reach.
  The gap between the two is the engine's overhead; a target above the second needs other kernels.

With exits runs (``exits``), a second table: each network with its exits under a MAC budget
against the same network without them, on the run's test images (``exit_latency``).

Prints the tables and writes JSON. Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import lcsurgery
from lcsurgery.bench.exit_latency import time_exits
from lcsurgery.bench.floor import record_kernels, replay
from lcsurgery.bench.threads import num_threads
from lcsurgery.models.factory import create_model
from lcsurgery.train.distributed import resolve_device
from lcsurgery.train.exits import exit_run_at_budget


@dataclass
class Row:
    """One timed variant."""

    model: str
    batch: int
    placement: str
    pattern: str
    ms: float  # median milliseconds per batch
    macs: float  # mean MACs per image under the placement (dense model: its MACs)
    speedup_vs_open: float | None = None
    mac_ratio_vs_open: float | None = None
    efficiency: float | None = None
    overhead_vs_original: float | None = None
    kernel_ms: float | None = None  # the variant's MAC-bearing kernels alone (median ms per batch)
    kernel_efficiency: float | None = None
    spread: dict = field(default_factory=dict)  # quartiles, to judge the noise


def force_pattern(lc: nn.Module, skip_fraction: float, channel_fraction: float) -> None:
    """Skip ``skip_fraction`` of the blocks (evenly spread) and keep the first ``channel_fraction``
    of every other block's gated channels, for every input."""
    blocks = lcsurgery.gated_blocks(lc)
    n_skip = round(skip_fraction * len(blocks))
    skipped = {round((i + 0.5) * len(blocks) / n_skip - 0.5) for i in range(n_skip)} if n_skip else set()
    for i, b in enumerate(blocks):
        if b.l_net is not None:
            b.force(keep=i not in skipped)
        if b.c_net is not None:
            b.force(channels=torch.arange(b.gated_channels) < max(1, round(channel_fraction * b.gated_channels)))


def open_gates(lc: nn.Module) -> None:
    for b in lcsurgery.gated_blocks(lc):
        b.reset_gates()


def time_round_robin(fns: dict[str, Callable[[], object]], rounds: int, warmup: int, budget_s: float = 90.0) -> dict[str, list[float]]:
    """Round-robin timing: each round runs every variant once, in a rotating order.

    Rounds are capped (at 7 or more) so that one table cell takes about ``budget_s``: a
    ResNet-50 at batch 64 on one thread takes seconds per call, a ResNet-20 at batch 1 a millisecond.
    """
    names = list(fns)
    t0 = time.perf_counter()
    for n in names:
        fns[n]()
    per_round = time.perf_counter() - t0
    for _ in range(min(warmup - 1, int(0.2 * budget_s / per_round))):
        for n in names:
            fns[n]()
    rounds = max(min(rounds, int(budget_s / per_round)), 7)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return samples


def bench_model(
    name: str,
    model: nn.Module,
    size: int,
    batches: list[int],
    patterns: dict[str, Callable[[nn.Module], None]],
    rounds: int,
    warmup: int,
    device: torch.device | str = "cpu",
) -> list[Row]:
    """Time one model: original, converted-open, and each pattern, both placements, each batch size."""
    device = torch.device(device)
    model = model.eval()
    rows: list[Row] = []
    variants: dict[str, nn.Module] = {}
    macs: dict[tuple[str, str], float] = {}
    for placement in ("parallel", "sequential"):
        for pattern, apply in patterns.items():
            lc = lcsurgery.convert(model, placement, input_size=(3, size, size)).eval()
            apply(lc)
            variants[f"{placement}/{pattern}"] = lc
    inputs = {batch: torch.randn(batch, 3, size, size) for batch in batches}
    with torch.no_grad():  # MACs on the CPU, before anything moves to ``device``
        for batch, x in inputs.items():
            for key, lc in variants.items():
                macs[(key, str(batch))] = lcsurgery.count_macs(lc, x[: min(batch, 16)], key.split("/")[0]).mean
        dense_macs = lcsurgery.count_macs(variants["parallel/open"], inputs[batches[0]][:1]).dense
    models = {"original": model} | variants
    for m in models.values():
        m.to(device)
    for batch, x in inputs.items():
        x = x.to(device)
        with torch.no_grad():
            fns = {k: _synced(lambda m=m: m(x), device) for k, m in models.items()}
            samples = time_round_robin(fns, rounds, warmup)
            floors = {k: _synced(replay(record_kernels(lambda m=m: m(x)), device=device), device) for k, m in models.items()}
            kernels = time_round_robin(floors, rounds, warmup, budget_s=45.0)
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        kmed = {k: statistics.median(v) * 1e3 for k, v in kernels.items()}
        q = {k: [round(t * 1e3, 4) for t in statistics.quantiles(v, n=4)] for k, v in samples.items()}
        rows.append(Row(name, batch, "-", "original", med["original"], dense_macs, kernel_ms=kmed["original"], spread={"quartiles_ms": q["original"]}))
        for key in variants:
            placement, pattern = key.split("/")
            open_key = f"{placement}/open"
            row = Row(name, batch, placement, pattern, med[key], macs[(key, str(batch))], kernel_ms=kmed[key], spread={"quartiles_ms": q[key]})
            if pattern == "open":
                row.overhead_vs_original = med[key] / med["original"] - 1
            else:
                row.speedup_vs_open = med[open_key] / med[key]
                row.mac_ratio_vs_open = macs[(open_key, str(batch))] / row.macs
                row.efficiency = row.speedup_vs_open / row.mac_ratio_vs_open
                row.kernel_efficiency = (kmed[open_key] / kmed[key]) / row.mac_ratio_vs_open
            rows.append(row)
    return rows


def _synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` that returns only once the device has finished its work (GPU kernels run asynchronously)."""
    if device.type != "cuda":
        return fn

    def run() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _cells(r: Row) -> list[str]:
    """One row's cells, shared by the printed and the Markdown table."""
    return [
        r.model, str(r.batch), r.placement, r.pattern, f"{r.ms:.3f}", f"{r.macs / 1e6:.2f}M",
        f"{r.speedup_vs_open:.2f}x" if r.speedup_vs_open else "", f"{r.mac_ratio_vs_open:.2f}x" if r.mac_ratio_vs_open else "",
        f"{r.efficiency:.2f}" if r.efficiency else "", f"{r.kernel_ms:.3f}" if r.kernel_ms is not None else "",
        f"{r.kernel_efficiency:.2f}" if r.kernel_efficiency else "",
        f"{100 * r.overhead_vs_original:+.1f}%" if r.overhead_vs_original is not None else "",
    ]  # fmt: skip


def format_table(rows: list[Row]) -> str:
    head = ("model", "batch", "placement", "gates", "ms", "MACs/img", "speedup", "MAC ratio", "efficiency", "kernel ms", "kernel eff", "open cost")
    lines = [_cells(r) for r in rows]
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 4 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*head)] + [fmt.format(*r) for r in lines])


def format_markdown(rows: list[Row]) -> str:
    """The table as Markdown, for a README (``<out>.md`` beside the JSON)."""
    lines = [
        "| model | batch | placement | gates | ms | MACs/img | speed-up vs open | MAC ratio vs open | efficiency | kernels alone (ms) | kernel-bound efficiency | open gates vs original |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(lines + ["| " + " | ".join(_cells(r)) + " |" for r in rows])


def bench_exits(run: Path, budget: float, batches: list[int], images: int, rounds: int, threads: int, device: torch.device | str = "cpu") -> list[dict]:
    """One exits run at ``budget`` (policy set on its held-out training images) against its network
    without exits, on its first ``images`` test images, per batch size."""
    model, _, _, test = exit_run_at_budget(run, budget, images)
    x = torch.cat([b for b, _ in test])
    return [{"run": str(run), "budget": budget, **time_exits(model, x, rounds, threads, batch=b, device=device)} for b in batches]


def format_exits_markdown(rows: list[dict]) -> str:
    """The exits table as Markdown: per run and batch size, time and MACs with and without exits."""
    lines = [
        "| exits run | budget | batch | ms / image without exits | ms / image with exits | MACs/img without | MACs/img with | speed-up | MAC ratio | efficiency |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['budget']} | {r['batch']} | {r['no_exits_ms_per_image']:.3f} | {r['exits_ms_per_image']:.3f} | {r['no_exits_macs'] / 1e6:.2f}M | "
            f"{r['exits_macs'] / 1e6:.2f}M | {r['speedup']:.2f}x | {r['mac_ratio']:.2f}x | {r['efficiency']:.2f} |"
        )  # fmt: skip
    return "\n".join(lines)


MODELS = {
    "cifar:resnet20": 32,
    "cifar:resnet56": 32,
    "torchvision:resnet50": 224,
}


def run(
    models: list[str],
    batches: list[int],
    threads: int,
    rounds: int,
    warmup: int,
    out: Path,
    checkpoint: dict[str, str] | None = None,
    trained: dict[str, str] | None = None,
    device: str = "cpu",
    exits: list[str] = (),
    exit_budget: float = 0.5,
    exit_images: int = 256,
    exit_rounds: int = 5,
) -> list[Row]:
    """The benchmark; ``trained`` maps a model spec to a run folder whose gates to time too;
    ``exits`` are exits run folders to time at ``exit_budget`` (``exit_rounds`` rounds over
    ``exit_images`` test images each)."""
    on_gpu = resolve_device(device).type == "cuda"
    with num_threads(threads):
        rows: list[Row] = []
        patterns = {
            "open": open_gates,
            "skip30+half": lambda lc: force_pattern(lc, 0.3, 0.5),
            "skip60+half": lambda lc: force_pattern(lc, 0.6, 0.5),
        }
        for spec in tqdm(models, desc="models"):
            size = MODELS.get(spec, 224)
            model = create_model(spec).eval()
            if checkpoint and spec in checkpoint:
                lcsurgery.load_weights(model, checkpoint[spec])
            pats = dict(patterns)
            if trained and spec in trained:
                state = torch.load(Path(trained[spec]) / "model.pt", map_location="cpu", weights_only=True)
                pats["trained"] = lambda lc, s=state: lcsurgery.load_weights(lc, s)
            rows += bench_model(spec, model, size, batches, pats, rounds, warmup, device)
            print(format_table([r for r in rows if r.model == spec]), flush=True)
        exit_rows = []
        for run_dir in tqdm(exits, desc="exits runs"):
            exit_rows += bench_exits(Path(run_dir), exit_budget, batches, exit_images, exit_rounds, threads, resolve_device(device))
    if exit_rows:
        print(format_exits_markdown(exit_rows), flush=True)
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "threads": threads,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu": cpu_name(),
        "device": torch.cuda.get_device_name(torch.device(device)) if on_gpu else "cpu",
        "rounds": rounds,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows], "exits": exit_rows}, indent=2))
    out.with_suffix(".md").write_text(format_markdown(rows) + "\n" + (f"\n{format_exits_markdown(exit_rows)}\n" if exit_rows else ""))
    return rows


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
