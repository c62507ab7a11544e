"""The command line: subcommands run, bad input gets one clear error and exit status 2."""

from __future__ import annotations

from lcsurgery.cli import main


def test_demo_shows_blocks_and_exactness(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "CifarResNet: 9 residual blocks to gate" in out
    assert out.count("9 gated blocks") == 2


def test_unknown_model_spec(capsys):
    assert main(["demo", "--model", "resnet50"]) == 2
    assert "unknown model spec 'resnet50'" in capsys.readouterr().err
