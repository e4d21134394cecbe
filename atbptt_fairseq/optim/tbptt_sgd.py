"""Plain SGD with a dataclass config.

fairseq's ``sgd`` is a legacy optimizer whose config lands in the checkpoint as a pickled
``argparse.Namespace``, which torch's default ``weights_only`` loading rejects. This one is
``torch.optim.SGD`` with the same options, so our checkpoints hold no unsafe globals.
"""

from dataclasses import dataclass, field
from typing import List

import torch
from fairseq.dataclass import FairseqDataclass
from fairseq.optim import FairseqOptimizer, register_optimizer
from omegaconf import II


@dataclass
class TbpttSgdConfig(FairseqDataclass):
    momentum: float = field(default=0.0, metadata={"help": "momentum factor"})
    weight_decay: float = field(default=0.0, metadata={"help": "weight decay"})
    lr: List[float] = II("optimization.lr")


@register_optimizer("tbptt_sgd", dataclass=TbpttSgdConfig)
class TbpttSgd(FairseqOptimizer):
    def __init__(self, cfg: TbpttSgdConfig, params) -> None:
        super().__init__(cfg)
        self._optimizer = torch.optim.SGD(params, **self.optimizer_config)

    @property
    def optimizer_config(self) -> dict:
        """Overrides for the optimizer state stored in checkpoints (e.g. a new learning rate)."""
        return {
            "lr": self.cfg.lr[0],
            "momentum": self.cfg.momentum,
            "weight_decay": self.cfg.weight_decay,
        }

    @property
    def supports_flat_params(self) -> bool:
        return True
