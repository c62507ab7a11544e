"""``lcsurgery finetune`` options: defaults from one source, clear errors, run folders that are not overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lcsurgery
from lcsurgery.cli import main
from lcsurgery.models.cifar_resnet import resnet56
from lcsurgery.train.build import build_model
from lcsurgery.train.config import FinetuneConfig

TINY = str(Path(__file__).parent / "assets" / "tiny_model.py") + ":tiny"
FAST = ["--data", "synthetic:400", "--test-subset", "100", "--batch-size", "40", "--epochs", "2"]


def test_cli_defaults_are_the_config_defaults():
    """``lcsurgery finetune`` and ``FinetuneConfig`` agree on every default (one source: the config),
    and the benchmark's parser takes them too without touching its own ``--out``."""
    import argparse

    from lcsurgery.cli import bench as bench_cli
    from lcsurgery.cli import finetune as finetune_cli

    p = argparse.ArgumentParser()
    finetune_cli.add_arguments(p)
    args = vars(p.parse_args(["--model", "cifar:resnet20"]))
    assert FinetuneConfig(**{k: v for k, v in args.items() if k in FinetuneConfig.__dataclass_fields__}) == FinetuneConfig(model="cifar:resnet20")
    assert set(FinetuneConfig.__dataclass_fields__) - set(args) == {"momentum"}  # the one option the CLI does not expose
    b = argparse.ArgumentParser()
    bench_cli.add_arguments(b)
    tr = vars(b.parse_args(["tradeoff", "--model", "cifar:resnet20"]))
    assert tr["out"] == "runs/tradeoff" and tr["lr"] == FinetuneConfig.lr and tr["budget_ramp"] == FinetuneConfig.budget_ramp


@pytest.mark.parametrize("gates", ["layer", "channel"])
def test_gates_option_builds_only_those_gates(gates):
    lc = build_model(FinetuneConfig(model="cifar:resnet20", gates=gates), 10)
    blocks = lcsurgery.gated_blocks(lc)
    assert len(blocks) == 9
    assert all((b.l_net is not None) == (gates == "layer") and (b.c_net is not None) == (gates == "channel") for b in blocks)


class TestCliErrors:
    def _err(self, capsys, args) -> str:
        assert main(["finetune", *args]) == 2
        return capsys.readouterr().err

    def test_unknown_gate_kind(self, capsys, tmp_path):
        with pytest.raises(lcsurgery.LCSurgeryError, match="--gates must be one of layer\\+channel, layer, channel, got 'both'"):
            FinetuneConfig(model="cifar:resnet20", gates="both")
        with pytest.raises(SystemExit):
            main(["finetune", "--model", "cifar:resnet20", "--gates", "both", "--out", str(tmp_path / "a")])
        assert "invalid choice: 'both'" in capsys.readouterr().err

    def test_unknown_model_spec(self, capsys, tmp_path):
        assert "unknown model spec 'resnet99'" in self._err(capsys, ["--model", "resnet99", "--out", str(tmp_path / "a")])

    def test_missing_data(self, capsys, tmp_path):
        err = self._err(capsys, ["--model", "cifar:resnet20", "--data", str(tmp_path / "none.tar.gz"), "--out", str(tmp_path / "a")])
        assert "does not exist" in err

    def test_checkpoint_of_another_architecture(self, capsys, tmp_path):
        ckpt = tmp_path / "r56.pt"
        torch.save(resnet56().state_dict(), ckpt)
        err = self._err(capsys, ["--model", "cifar:resnet20", "--checkpoint", str(ckpt), *FAST, "--out", str(tmp_path / "a")])
        assert "checkpoint does not fit" in err and "unexpected" in err

    @pytest.mark.parametrize("budget", ["0", "1.2"])
    def test_budget_outside_unit_interval(self, capsys, tmp_path, budget):
        err = self._err(capsys, ["--model", TINY, "--budget", budget, *FAST, "--out", str(tmp_path / "a")])
        assert "must be in (0, 1]" in err

    @pytest.mark.parametrize("ramp", ["0", "1.5"])
    def test_budget_ramp_outside_unit_interval(self, capsys, tmp_path, ramp):
        assert "--budget-ramp is a share of training in (0, 1)" in self._err(capsys, ["--model", TINY, *FAST, "--budget", "0.5", "--budget-ramp", ramp, "--out", str(tmp_path / "a")])

    @pytest.mark.parametrize("freeze", ["0.5", "1.2"])
    def test_freeze_gates_outside_ramp_to_end(self, capsys, tmp_path, freeze):
        err = self._err(capsys, ["--model", TINY, *FAST, "--budget", "0.5", "--freeze-gates", freeze, "--out", str(tmp_path / "a")])
        assert f"--freeze-gates is the share of training after which the gates stop learning and must be in (--budget-ramp, 1] = (0.5, 1], got {freeze}" in err

    def test_freeze_gates_follows_the_ramp_by_default(self):
        assert FinetuneConfig(model=TINY).freeze_gates == 0.75
        assert FinetuneConfig(model=TINY, budget_ramp=0.8).freeze_gates == pytest.approx(0.9)  # a long ramp alone is no error
        assert FinetuneConfig(model=TINY, freeze_gates=None).freeze_gates is None

    def test_teacher_errors(self, capsys, tmp_path):
        assert "needs starting weights" in self._err(capsys, ["--model", TINY, *FAST, "--teacher", "start", "--out", str(tmp_path / "a")])
        err = self._err(capsys, ["--model", TINY, *FAST, "--teacher", str(tmp_path / "no-run"), "--out", str(tmp_path / "b")])
        assert f"no weights at {tmp_path / 'no-run'}" in err
        assert "drop --dense or --teacher" in self._err(capsys, ["--model", TINY, *FAST, "--dense", "--teacher", "start", "--out", str(tmp_path / "c")])
        ckpt = tmp_path / "r56.pt"
        torch.save(resnet56().state_dict(), ckpt)
        err = self._err(capsys, ["--model", "cifar:resnet20", *FAST, "--teacher", str(ckpt), "--out", str(tmp_path / "d")])
        assert "checkpoint does not fit" in err
        assert not any(tmp_path.joinpath(n).exists() for n in "abcd")  # a bad start leaves --out alone

    def test_out_is_not_overwritten_without_force_and_resume_checks_the_config(self, capsys, tmp_path):
        out = str(tmp_path / "run")
        args = ["--model", TINY, *FAST, "--epochs", "1", "--budget", "0.8", "--out", out]
        assert main(["finetune", *args]) == 0
        capsys.readouterr()
        before = (Path(out) / "model.pt").read_bytes()
        assert "already holds a run" in self._err(capsys, args)
        assert (Path(out) / "model.pt").read_bytes() == before
        err = self._err(capsys, [*args[:-2], "--budget", "0.5", "--out", out, "--resume"])
        assert "cannot resume" in err and "budget: 0.8 -> 0.5" in err
        assert main(["finetune", *args, "--force"]) == 0
