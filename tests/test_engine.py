"""Real skipping: equals masked execution everywhere, and executes exactly the accounted work."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from zoo import ZOO, ZOO_BY_NAME, example, original, randomize_gates

import lcsurgery

NAMES = [z.name for z in ZOO]


def _convert(name: str, placement: str) -> lcsurgery.LCModel:
    size = ZOO_BY_NAME[name].size
    return lcsurgery.convert(original(name), placement, input_size=(3, size, size)).eval()


def _outputs(lc, x, execution: str) -> torch.Tensor:
    lc.execution = execution
    with torch.no_grad():
        return lc(x)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", NAMES)
def test_skipping_equals_masked_execution(name, placement):
    """Same function, other schedule. In float64, so that what is compared is the logic: in float32 the
    rounding differences of folded BatchNorm compound through 50 random blocks of resnet152 to ~1e-2."""
    lc = _convert(name, placement).double()
    randomize_gates(lc, seed=5)
    for batch in (1, 17):
        x = example(name, batch=batch, seed=batch).double()
        masked = _outputs(lc, x, "masked")
        skipped = _outputs(lc, x, "skip")
        assert (skipped - masked).abs().max() <= 1e-4 * masked.abs().max(), batch
    keep = torch.cat([b.last.keep() for b in lcsurgery.gated_blocks(lc)])
    assert 0 < int(keep.sum()) < keep.numel()  # some blocks ran, some were skipped


@pytest.mark.parametrize("name", ["cifar.resnet20", "tv.convnext_tiny"])
def test_gate_state_after_skipping_equals_the_masked_one(name):
    """``block.last`` (what MAC counting reads) holds the same logits under both executions, batch 1 included."""
    lc = _convert(name, "sequential")
    randomize_gates(lc, seed=2)
    for batch in (1, 3):
        x = example(name, batch=batch)
        states = {}
        for execution in ("masked", "skip"):
            _outputs(lc, x, execution)
            states[execution] = [(b.last.z_l, b.last.z_c, b.last.keep(), b.last.active()) for b in lcsurgery.gated_blocks(lc)]
        for masked, skipped in zip(states["masked"], states["skip"], strict=True):
            for a, b in zip(masked, skipped, strict=True):
                assert (a is None and b is None) or (a.shape == b.shape and torch.allclose(a.float(), b.float(), atol=1e-5))


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["tv.resnet18", "tv.resnet50", "tv.mobilenet_v2", "cifar.resnet20"])
def test_batch_one_executes_exactly_the_accounted_macs(name, placement):
    lc = _convert(name, placement)
    randomize_gates(lc, seed=9)
    for seed in range(3):
        x = example(name, batch=1, seed=seed)
        accounted = int(lcsurgery.count_macs(lc, x).per_sample[0])
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            lc(x)
        assert counter.get_total_flops() == 2 * accounted  # torch counts a multiply-accumulate as 2 flops


def test_skipped_block_does_not_run_its_branch():
    lc = _convert("cifar.resnet20", "sequential")
    blocks = lcsurgery.gated_blocks(lc)
    x = example("cifar.resnet20", batch=1)
    with torch.no_grad(), FlopCounterMode(display=False) as open_counter:
        lc(x)
    blocks[1].force(keep=False)
    with torch.no_grad(), FlopCounterMode(display=False) as skip_counter:
        lc(x)
    branch = 2 * 16 * 16 * 9 * 32 * 32  # two 3x3 convs, 16 -> 16 channels, at 32x32
    assert open_counter.get_total_flops() - skip_counter.get_total_flops() == 2 * branch


def test_plans_follow_weight_changes():
    lc = _convert("cifar.resnet20", "sequential")
    x = example("cifar.resnet20", batch=2)
    before = _outputs(lc, x, "skip")
    with torch.no_grad():
        lc.lc_gates.layer1_0.c_net.bias[:8] = -1.0  # in-place gate edit: plan must notice
    assert not torch.allclose(_outputs(lc, x, "skip"), before)
    assert torch.allclose(_outputs(lc, x, "skip"), _outputs(lc, x, "masked"), atol=1e-5)
    state = {k: v.clone() for k, v in lc.state_dict().items()}
    state["layer2.0.bn1.running_mean"] += 1.0
    lc.load_state_dict(state)  # new BatchNorm statistics: folded weights must be rebuilt
    assert torch.allclose(_outputs(lc, x, "skip"), _outputs(lc, x, "masked"), atol=1e-5)


def test_autograd_in_eval_mode_reaches_every_parameter():
    lc = _convert("cifar.resnet20", "parallel")  # eval mode, e.g. fine-tuning with BatchNorm frozen
    lc(example("cifar.resnet20", batch=2)).sum().backward()
    assert all(p.grad is not None for n, p in lc.named_parameters() if not n.startswith("lc_gates"))


def test_onnx_export_of_the_masked_model(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    lc = _convert("cifar.resnet20", "sequential")
    randomize_gates(lc, seed=2)
    x = example("cifar.resnet20", batch=1)
    path = tmp_path / "lc.onnx"
    with torch.no_grad():
        torch.onnx.export(lc, (x,), str(path), dynamo=False, input_names=["x"], output_names=["y"])
        expected = _outputs(lc, x, "masked")
    onnx.checker.check_model(onnx.load(str(path)))
    (got,) = ReferenceEvaluator(str(path)).run(None, {"x": x.numpy()})
    assert torch.allclose(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-4)
