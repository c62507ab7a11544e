"""``python -m lcsurgery.cli``: the same as the ``lcsurgery`` command (torchrun launches this)."""

from lcsurgery.cli import main

raise SystemExit(main())
