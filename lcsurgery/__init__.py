"""lcsurgery: retrofit pretrained residual CNNs with LC-Net per-input dynamic inference.

Typical use::

    lc = lcsurgery.convert(model, placement="sequential")
    lcsurgery.find_blocks(model)        # dry run: what would be gated, and why
    lcsurgery.gated_blocks(lc)          # the gates, to inspect or force
    lcsurgery.count_macs(lc.eval(), x)  # exact MACs each image needs

    ex = lcsurgery.add_exits(model)     # early exits (heads at 15-90% of the MACs)
    lcsurgery.set_budget(ex, 0.5, calibration=held_out_images)  # a MAC budget set at inference

Fine-tuning lives in ``lcsurgery.train`` (``finetune``, ``FinetuneConfig``, ``gate_l1``,
``macs_penalty``, ``param_groups``, ``BudgetController``); importing ``lcsurgery`` alone does
not load the training loop, torchrun support or the data loaders.
"""

from lcsurgery.macs.dynamic import count_macs, last_macs
from lcsurgery.macs.report import BlockMacs, MacReport
from lcsurgery.macs.static import static_costs
from lcsurgery.errors import CheckpointMismatchError, LCSurgeryError, NoResidualBlocksError, TraceError
from lcsurgery.engine.state import GateState
from lcsurgery.exits.model import ExitModel, ExitPolicy, add_exits, exit_points
from lcsurgery.exits.policy import set_budget
from lcsurgery.surgery.block import BlockInfo, GatedBlock
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.surgery.convert import BlockList, convert, find_blocks, gated_blocks
from lcsurgery.surgery.model import LCModel

__version__ = "0.1.0"

__all__ = [
    "BlockInfo",
    "BlockMacs",
    "MacReport",
    "BlockList",
    "CheckpointMismatchError",
    "ExitModel",
    "ExitPolicy",
    "GateState",
    "GatedBlock",
    "LCModel",
    "LCSurgeryError",
    "NoResidualBlocksError",
    "TraceError",
    "add_exits",
    "convert",
    "exit_points",
    "count_macs",
    "last_macs",
    "static_costs",
    "find_blocks",
    "gated_blocks",
    "load_weights",
    "set_budget",
]
