"""Learning-rate schedules for the meta-optimizer, stepped once per meta-iteration.

conf/schedule/ chooses one; each is a torch.optim.lr_scheduler class, so its state goes into checkpoints
and a resumed run continues the schedule where it stopped. `constant` builds no scheduler at all.
"""

from __future__ import annotations

from typing import Optional

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshot.errors import ConfigError

LRScheduler = torch.optim.lr_scheduler.LRScheduler


def make_scheduler(node: Optional[DictConfig], optimizer: torch.optim.Optimizer) -> Optional[LRScheduler]:
    """The scheduler a `schedule:` node describes, or None for a constant learning rate."""
    if node is None or node.get("_target_") is None:
        return None
    for key, value in node.items():
        if key in ("_target_", "_partial_", "name"):
            continue
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ConfigError(f"schedule.{key}={value}: must be a non-negative number")
    spec = OmegaConf.create({k: v for k, v in node.items() if k != "name"})
    return instantiate(spec, _convert_="all")(optimizer)
