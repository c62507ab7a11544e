"""The house has floors: the import-linter contracts in setup.cfg hold, and no library module
below the command line and the benchmarks imports the package root (whose ``__init__`` imports them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    from importlinter.cli import EXIT_STATUS_SUCCESS, lint_imports

    assert lint_imports(config_filename=str(ROOT / "setup.cfg")) == EXIT_STATUS_SUCCESS, "an import breaks a contract in setup.cfg (see the report above)"


def test_library_modules_do_not_import_the_package_root():
    graph = grimp.build_graph("lcsurgery")
    importers = {m for m in graph.find_modules_that_directly_import("lcsurgery")}
    below = {m for m in importers if m.split(".")[1] not in ("cli", "bench")}
    assert not below, f"these modules import the package root (import the module they need instead): {sorted(below)}"


def test_importing_the_package_loads_no_training_data_or_ddp():
    code = "import sys, lcsurgery; print(sorted(m for m in sys.modules if m.startswith(('lcsurgery.train', 'lcsurgery.data', 'torch.distributed.run'))))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
