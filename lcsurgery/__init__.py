"""lcsurgery: retrofit pretrained residual CNNs with LC-Net per-input dynamic inference.

Typical use::

    lc = lcsurgery.convert(model, placement="sequential")
    lcsurgery.find_blocks(model)        # dry run: what would be gated, and why
    lcsurgery.gated_blocks(lc)          # the gates, to inspect or force
    lcsurgery.count_macs(lc.eval(), x)  # exact MACs each image needs
    loss = F.cross_entropy(lc(x), y) + lam * lcsurgery.gate_l1(lc)   # fine-tuning
"""

from lcsurgery.macs.dynamic import count_macs, last_macs
from lcsurgery.macs.report import BlockMacs, MacReport
from lcsurgery.macs.static import static_costs
from lcsurgery.errors import CheckpointMismatchError, LCSurgeryError, NoResidualBlocksError, TraceError
from lcsurgery.surgery.block import BlockInfo, GatedBlock, GateState
from lcsurgery.surgery.checkpoint import load_weights
from lcsurgery.surgery.convert import BlockList, convert, find_blocks, gated_blocks
from lcsurgery.surgery.model import LCModel
from lcsurgery.train.budget import BudgetController
from lcsurgery.train.loop import FinetuneConfig, finetune
from lcsurgery.train.optim import param_groups
from lcsurgery.train.regularize import gate_l1, macs_penalty

__version__ = "0.1.0"

__all__ = [
    "BlockInfo",
    "BudgetController",
    "FinetuneConfig",
    "BlockMacs",
    "MacReport",
    "BlockList",
    "CheckpointMismatchError",
    "GateState",
    "GatedBlock",
    "LCModel",
    "LCSurgeryError",
    "NoResidualBlocksError",
    "TraceError",
    "convert",
    "count_macs",
    "last_macs",
    "static_costs",
    "find_blocks",
    "gated_blocks",
    "load_weights",
    "finetune",
    "gate_l1",
    "macs_penalty",
    "param_groups",
]
