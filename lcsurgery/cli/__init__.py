"""The ``lcsurgery`` command: one subcommand per workflow."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lcsurgery.cli import bench, compare, demo, exits, figures, finetune
from lcsurgery.errors import LCSurgeryError

COMMANDS = {"demo": demo, "finetune": finetune, "compare": compare, "figures": figures, "bench": bench, "exits": exits}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcsurgery", description="LC-Net dynamic inference for residual CNNs")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0], description=module.__doc__))
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command].run(args) or 0
    except LCSurgeryError as exc:
        print(f"lcsurgery {args.command}: error: {exc}", file=sys.stderr)
        return 2
