"""The Torch-Pruning baseline: pruned where C-Nets gate, to the budget, rebuilt from its run folder."""

from __future__ import annotations

import builtins
import json

import pytest
import torch

from lcsurgery.baselines import torch_pruning as tpb
from lcsurgery.errors import LCSurgeryError
from lcsurgery.macs.static import fvcore_macs
from lcsurgery.models.cifar_resnet import resnet20
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune
from lcsurgery.train.run_folder import load_run

pytest.importorskip("torch_pruning", reason="the Torch-Pruning baseline needs the optional torch-pruning package (lcsurgery[compare])")
SIZE = (3, 32, 32)


@pytest.mark.parametrize("budget", [0.35, 0.5, 0.7])
def test_prunes_only_the_gated_channels_to_the_budget(budget):
    model = resnet20()
    dense = fvcore_macs(model.eval(), (torch.zeros(1, *SIZE),))
    pruned, structure = tpb.prune_to_budget(model, budget, SIZE)
    fraction = fvcore_macs(pruned.eval(), (torch.zeros(1, *SIZE),)) / dense
    assert abs(fraction - budget) <= 0.03 * budget  # channel counts are whole numbers
    assert set(structure) == {f"layer{s}.{i}.conv1" for s in (1, 2, 3) for i in range(3)}
    kept = dict(pruned.named_modules())
    for name, channels in structure.items():
        block = name.rsplit(".", 1)[0]
        assert kept[name].out_channels == channels == kept[block + ".bn1"].num_features == kept[block + ".conv2"].in_channels
        assert kept[block + ".conv2"].out_channels == model.get_submodule(block + ".conv2").out_channels  # block outputs untouched
    assert pruned.conv1.out_channels == model.conv1.out_channels and pruned.linear.in_features == model.linear.in_features
    assert model.layer1[0].conv1.out_channels == 16  # the original is left alone


def test_apply_structure_cuts_a_fresh_model_to_the_saved_shape():
    pruned, structure = tpb.prune_to_budget(resnet20(), 0.5, SIZE)
    fresh = tpb.apply_structure(resnet20(), structure, SIZE)
    fresh.load_state_dict(pruned.state_dict())  # same shapes everywhere
    x = torch.randn(2, *SIZE)
    assert torch.allclose(fresh.eval()(x), pruned.eval()(x))
    with pytest.raises(LCSurgeryError, match="cannot rebuild the pruned model: layer1.0.conv1 has 16 channels, the run kept 99"):
        tpb.apply_structure(resnet20(), {"layer1.0.conv1": 99}, SIZE)


def test_missing_package_is_one_clear_error(monkeypatch):
    real_import = builtins.__import__

    def no_tp(name, *args, **kwargs):
        if name == "torch_pruning":
            raise ImportError("No module named 'torch_pruning'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tp)
    with pytest.raises(LCSurgeryError, match=r'needs the torch-pruning package: pip install "lcsurgery\[compare\]"'):
        tpb.prune_to_budget(resnet20(), 0.5, SIZE)


@pytest.mark.slow
def test_pruned_run_trains_reports_its_budget_and_loads_back(tmp_path):
    out = tmp_path / "tp"
    ckpt = tmp_path / "r20.pt"
    torch.save(resnet20().state_dict(), ckpt)
    metrics = finetune(FinetuneConfig(model="cifar:resnet20", checkpoint=str(ckpt), data="synthetic:200", test_subset=50, batch_size=50, epochs=1, budget=0.5, prune="torch-pruning", out=str(out)))
    assert metrics["prune"] == "torch-pruning" and metrics["placement"] is None
    assert metrics["dense_macs"] == fvcore_macs(resnet20().eval(), (torch.zeros(1, *SIZE),))
    assert metrics["budget_met"] and abs(metrics["mac_fraction"] - 0.5) <= 0.015
    structure = json.loads((out / "structure.json").read_text())
    model, cfg, _ = load_run(out)
    assert {n: model.get_submodule(n).out_channels for n in structure} == structure and cfg.prune == "torch-pruning"


def test_prune_options_are_checked():
    with pytest.raises(LCSurgeryError, match="--prune prunes the model to --budget"):
        FinetuneConfig(model="cifar:resnet20", prune="torch-pruning")
    with pytest.raises(LCSurgeryError, match="--prune must be one of torch-pruning"):
        FinetuneConfig(model="cifar:resnet20", prune="magic", budget=0.5)
