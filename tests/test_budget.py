"""The MAC budget lands: eval-mode mean MACs within 5% of the target, on the CIFAR ResNet-20.

With ../shared present: the pretrained ResNet-20 on CIFAR-10 (JPEG); without it: the ResNet-20
that ships pretrained on the built-in shapes task, on that task.

Parallel is tested at 0.7: there a kept block pays its first conv in full (half of a ResNet-20
block), so channel gates alone cannot go much below 0.6 and the cost leans on skipping whole
blocks, which moves it in coarse steps. On the built-in shapes (CI's case), one thread,
2026-11-23: parallel 0.7, seeds 0-3, landed at 0.704, 0.711, 0.691, 0.699; sequential 0.5,
seeds 0-1, at 0.498, 0.502. Before the gates kept their learning rate to the end and the
controller measured its offset on one model state, seed 1 froze at 0.738 (a CI machine: 0.745).
"""

from __future__ import annotations

import pytest

from conftest import SHARED

from lcsurgery.assets import SHAPES_RESNET20
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune


@pytest.mark.parametrize("placement,budget", [("sequential", 0.5), ("parallel", 0.7)])
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
