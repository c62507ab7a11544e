"""Distillation from a dense teacher: the loss term, the teacher, and its effect on a run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lcsurgery.bench.tradeoff import plan
from lcsurgery.models.factory import create_model
from lcsurgery.train.build import build_model
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.distill import build_teacher, distill_loss
from lcsurgery.train.loop import finetune

TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
FAST = ["--data", "synthetic:400", "--test-subset", "100", "--batch-size", "40", "--epochs", "2"]


class TestDistillation:
    def test_distill_loss_is_the_tempered_kl_scaled_by_t_squared(self):
        torch.manual_seed(0)
        s, t = torch.randn(6, 10), torch.randn(6, 10)
        p = torch.softmax(t / 4, 1)
        expected = (p * (p.log() - torch.log_softmax(s / 4, 1))).sum(1).mean() * 16
        assert distill_loss(s, t, 4.0) == pytest.approx(float(expected), rel=1e-5)
        assert distill_loss(t, t, 4.0) == pytest.approx(0.0, abs=1e-6)

    def test_start_teacher_is_the_starting_model_frozen(self, tmp_path):
        ckpt = tmp_path / "start.pt"
        torch.manual_seed(1)
        torch.save(create_model(TINY).state_dict(), ckpt)
        cfg = FinetuneConfig(model=TINY, checkpoint=str(ckpt), teacher="start")
        teacher, student = build_teacher(cfg, 10), build_model(cfg, 10).eval()
        x = torch.randn(4, 3, 32, 32)
        assert torch.allclose(teacher(x), student(x), atol=1e-5)  # gates start open: same function
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())

    def test_tradeoff_gated_runs_distil_from_its_dense_run(self, tmp_path):
        runs = {r.name: r.cfg for r in plan(FinetuneConfig(model=TINY, teacher="dense"), [0.5], tmp_path)}
        assert runs["dense"].teacher is None and runs["dense"].dense
        assert {n: r.teacher for n, r in runs.items() if n != "dense"} == {n: str(tmp_path / "dense") for n in ("static-sequential-50", "sequential-50", "parallel-50")}

    @pytest.mark.slow
    def test_weight_zero_is_plain_training_and_a_teacher_changes_the_result(self, tmp_path):
        common = dict(model=TINY, data="synthetic:400", test_subset=100, batch_size=40, epochs=1, seed=2)
        finetune(FinetuneConfig(**common, dense=True, out=str(tmp_path / "dense")))
        common["budget"] = 0.7
        for name, extra in (("plain", {}), ("w0", {"teacher": str(tmp_path / "dense"), "distill_weight": 0.0}), ("w9", {"teacher": str(tmp_path / "dense")})):
            finetune(FinetuneConfig(**common, **extra, out=str(tmp_path / name)))
        plain, w0, w9 = (torch.load(tmp_path / n / "model.pt", weights_only=True) for n in ("plain", "w0", "w9"))
        assert all(torch.equal(plain[k], w0[k]) for k in plain)
        assert any(not torch.allclose(plain[k], w9[k]) for k in plain if plain[k].is_floating_point())
