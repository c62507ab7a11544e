"""The MAC budget lands: eval-mode mean MACs within 5% of the target, on the CIFAR ResNet-20.

With ../shared present: the pretrained ResNet-20 on CIFAR-10 (JPEG); without it: the ResNet-20
that ships pretrained on the built-in shapes task, on that task.
"""

from __future__ import annotations

import pytest

from conftest import SHARED

from lcsurgery.assets import SHAPES_RESNET20
from lcsurgery.train.loop import FinetuneConfig, finetune


@pytest.mark.parametrize("placement,budget", [("sequential", 0.5), ("parallel", 0.6)])
def test_budget_lands_within_five_percent(tmp_path, placement, budget):
    have_shared = (SHARED / "models" / "cifar10-resnet20.th").exists()
    cfg = FinetuneConfig(
        model="cifar:resnet20",
        checkpoint=str(SHARED / "models" / "cifar10-resnet20.th") if have_shared else str(SHAPES_RESNET20),
        data=str(SHARED / "data" / "cifar10-jpg.tar.gz") if have_shared else "synthetic:6000",
        train_subset=6000, test_subset=1000, epochs=4, batch_size=32,  # 750 steps
        budget=budget, placement=placement, out=str(tmp_path / "run"),
    )  # fmt: skip
    metrics = finetune(cfg)
    fraction = metrics["mean_macs"] / metrics["dense_macs"]
    assert abs(fraction - budget) <= 0.05 * budget, f"eval MACs {fraction:.3f} of dense for a budget of {budget}"
    assert metrics["val_accuracy"] > (0.6 if have_shared else 0.4)
