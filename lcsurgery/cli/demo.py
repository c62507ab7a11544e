"""Convert a built-in CIFAR ResNet-20 and show what the surgery did.

Runs offline: the model is built in, ``--checkpoint`` loads real weights when you have them.
"""

from __future__ import annotations

import argparse

import torch

import lcsurgery
from lcsurgery.models.factory import SPEC_HELP, create_model


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="cifar:resnet20", help=f"model spec: {SPEC_HELP}")
    p.add_argument("--checkpoint", help="weights to load (original or converted)")
    p.add_argument("--input-size", type=int, default=32, help="square input resolution")


def run(args: argparse.Namespace) -> int:
    model = create_model(args.model).eval()
    if args.checkpoint:
        lcsurgery.load_weights(model, args.checkpoint)
    size = (3, args.input_size, args.input_size)
    print(lcsurgery.find_blocks(model, input_size=size))
    x = torch.randn(8, *size)
    for placement in ("parallel", "sequential"):
        lc = lcsurgery.convert(model, placement, input_size=size).eval()
        with torch.no_grad():
            ref, out = model(x), lc(x)
        diff = float((out - ref).abs().max() / ref.abs().max())
        print(f"{placement:>10}: {len(lcsurgery.gated_blocks(lc))} gated blocks, max |converted - original| = {diff:.1e} x output scale")
    return 0
