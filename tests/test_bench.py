"""Benchmark plumbing that can be checked without timing anything."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode
from zoo import example, original, randomize_gates

import lcsurgery
from lcsurgery.bench.floor import record_kernels, replay
from lcsurgery.bench.kernels import ConvShape, conv_shapes
from lcsurgery.bench import latency
from lcsurgery.bench.latency import Row, format_table
from lcsurgery.models.factory import create_model


def test_conv_shapes_of_resnet20_are_its_six_distinct_convs():
    shapes = conv_shapes(create_model("cifar:resnet20"), (3, 32, 32))
    k3, s1, s2, p1 = (3, 3), (1, 1), (2, 2), (1, 1)
    assert {s: len(names) for s, names in shapes.items()} == {
        ConvShape(3, 16, k3, s1, p1, 32, 32): 1,
        ConvShape(16, 16, k3, s1, p1, 32, 32): 6,
        ConvShape(16, 32, k3, s2, p1, 32, 32): 1,
        ConvShape(32, 32, k3, s1, p1, 16, 16): 5,
        ConvShape(32, 64, k3, s2, p1, 16, 16): 1,
        ConvShape(64, 64, k3, s1, p1, 8, 8): 5,
    }
    assert shapes[ConvShape(16, 32, k3, s2, p1, 32, 32)] == ["layer2.0.conv1"]


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_conv_shapes_cover_every_conv_once(name):
    model = getattr(torchvision.models, name)()
    shapes = conv_shapes(model, (3, 64, 64))
    names = [n for convs in shapes.values() for n in convs]
    assert sorted(names) == sorted(n for n, m in model.named_modules() if m.__class__.__name__ == "Conv2d")
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # hooks removed


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["cifar.resnet20", "tv.resnet18", "tv.mobilenet_v2", "tv.convnext_tiny", "timm.seresnext26d_32x4d"])
def test_recorded_kernels_are_what_torch_counts_and_replay_makes_the_same_calls(name, placement):
    """The kernel floor times exactly the conv and matrix work the forward did: its MACs equal
    torch's own flop counter (an independent count, 2 flops a MAC), and the replay makes the
    same calls with the same shapes."""
    lc = lcsurgery.convert(original(name), placement).eval()
    randomize_gates(lc, seed=4)
    for batch in (1, 3):
        x = example(name, batch=batch, seed=batch)
        calls = record_kernels(lambda: lc(x))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            lc(x)
        assert 2 * sum(c.macs for c in calls) == counter.get_total_flops() > 0
        assert record_kernels(replay(calls)) == calls


def test_recorded_kernels_of_the_original_model_are_its_dense_macs():
    model = original("cifar.resnet20")
    calls = record_kernels(lambda: model(example("cifar.resnet20", batch=1)))
    assert sum(c.macs for c in calls) == lcsurgery.count_macs(lcsurgery.convert(model), example("cifar.resnet20", batch=1)).dense == 40_551_040
    assert [c.op for c in calls] == ["conv2d"] * 19 + ["linear"]


def test_latency_table_shows_kernel_floor_columns():
    rows = [
        Row("m", 1, "sequential", "open", 2.0, 100e6, kernel_ms=1.5, overhead_vs_original=0.01),
        Row("m", 1, "sequential", "skip", 1.0, 25e6, speedup_vs_open=2.0, mac_ratio_vs_open=4.0, efficiency=0.5, kernel_ms=0.5, kernel_efficiency=0.75),
    ]
    table = format_table(rows).splitlines()
    assert "kernel ms" in table[0] and "kernel eff" in table[0]
    assert table[1].split()[-2:] == ["1.500", "+1.0%"]
    assert table[2].split()[-4:] == ["4.00x", "0.50", "0.500", "0.75"]


def test_latency_benchmark_rows_and_json(tmp_path):
    """Every variant gets a row; MAC ratios are the exact counts' ratios and the kernel floor
    replays the variant's own work (no assertion on time: machines are noisy)."""
    out = tmp_path / "lat.json"
    rows = latency.run(["cifar:resnet20"], [1], threads=1, rounds=7, warmup=1, out=out)
    keys = [(r.placement, r.pattern) for r in rows]
    patterns = ["open", "skip30+half", "skip60+half"]
    assert keys == [("-", "original")] + [(p, g) for p in ("parallel", "sequential") for g in patterns]
    by = {k: r for k, r in zip(keys, rows)}
    assert by[("-", "original")].macs == 40_551_040
    for placement in ("parallel", "sequential"):
        opened, cut = by[(placement, "open")], by[(placement, "skip60+half")]
        assert opened.overhead_vs_original is not None and opened.efficiency is None
        assert cut.mac_ratio_vs_open == opened.macs / cut.macs > 2.0
        assert cut.efficiency == pytest.approx(cut.speedup_vs_open / cut.mac_ratio_vs_open)
        assert all(r.kernel_ms > 0 for r in (opened, cut)) and cut.kernel_efficiency > 0
    assert by[("sequential", "skip60+half")].macs < by[("parallel", "skip60+half")].macs
    saved = json.loads(out.read_text())
    assert saved["meta"]["device"] == "cpu" and saved["meta"]["threads"] == 1 and len(saved["rows"]) == len(rows)
    markdown = out.with_suffix(".md").read_text().splitlines()
    assert len(markdown) == 2 + len(rows) and all(line.count("|") == 13 for line in markdown)
    assert markdown[-1].startswith("| cifar:resnet20 | 1 | sequential | skip60+half |")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_latency_benchmark_on_cuda_without_a_gpu_says_so(tmp_path):
    with pytest.raises(lcsurgery.LCSurgeryError, match="--device cuda: no CUDA device is visible"):
        latency.run(["cifar:resnet20"], [1], threads=1, rounds=7, warmup=1, out=tmp_path / "x.json", device="cuda")
    assert not (tmp_path / "x.json").exists()


def test_a_run_saved_without_gate_input_statistics_loads_with_identity_statistics(tmp_path):
    """Runs trained before the gates' input statistics existed keep their function: ``load_run`` fills
    the statistics with the identity (mean 0, scale 1) and loads every saved tensor."""
    from lcsurgery.bench.compare import load_run
    from lcsurgery.train.loop import FinetuneConfig, build_model

    cfg = FinetuneConfig(model="cifar:resnet20", placement="sequential")
    lc = build_model(cfg, 10)
    randomize_gates(lc, seed=4)
    old = {k: v for k, v in lc.state_dict().items() if not k.rsplit(".", 1)[-1].startswith("input_")}
    assert len(lc.state_dict()) - len(old) == 3 * 9
    torch.save(old, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in cfg.identity().items() if k != "gate_input_momentum"}))
    loaded, _, classes = load_run(tmp_path)
    assert classes == 10
    state = loaded.state_dict()
    assert all(torch.equal(state[k], v) for k, v in old.items())
    for block in lcsurgery.gated_blocks(loaded):
        assert not block.input_mean.any() and torch.equal(block.input_scale, torch.ones_like(block.input_scale))
