"""Fine-tuning a converted model: the loop behind ``lcsurgery finetune`` and the pieces it is made of.

  from lcsurgery.train import FinetuneConfig, finetune
  metrics = finetune(FinetuneConfig(model="cifar:resnet20", checkpoint="r20.th", data="cifar10.tar.gz", budget=0.5))

or, in a loop of your own, the gate penalties, the optimiser groups and the budget controller.
"""

from lcsurgery.train.budget import BudgetController
from lcsurgery.train.conditional import importance_loss
from lcsurgery.train.config import FinetuneConfig
from lcsurgery.train.loop import finetune
from lcsurgery.train.optim import param_groups
from lcsurgery.train.regularize import gate_l1, macs_penalty
from lcsurgery.train.run_folder import load_run

__all__ = ["BudgetController", "FinetuneConfig", "finetune", "gate_l1", "importance_loss", "load_run", "macs_penalty", "param_groups"]
