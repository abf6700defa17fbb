"""The meta-optimizer (conf/optim/) and its learning-rate schedule (conf/schedule/), stepped once per meta-iteration.

Both are torch classes instantiated from their (resolved, plain) config node, so their state goes into checkpoints
and a resumed run continues where it stopped. `schedule=constant` builds no scheduler at all.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from hydra.utils import instantiate

from fewshot.errors import ConfigError

LRScheduler = torch.optim.lr_scheduler.LRScheduler


def _spec(node: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in node.items() if k != "name"}


def make_optimizer(node: Mapping[str, Any], params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer an `optim:` node describes, over `params`."""
    try:
        return instantiate(_spec(node), _convert_="all")(params)
    except (TypeError, ValueError) as e:  # torch's own checks, e.g. "Invalid momentum value: -1"
        raise ConfigError(f"optim={node['name']}: {e}") from e


def make_scheduler(node: Optional[Mapping[str, Any]], optimizer: torch.optim.Optimizer) -> Optional[LRScheduler]:
    """The scheduler a `schedule:` node describes, or None for a constant learning rate."""
    if node is None or node.get("_target_") is None:
        return None
    for key, value in node.items():
        if key in ("_target_", "_partial_", "name"):
            continue
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ConfigError(f"schedule.{key}={value}: must be a non-negative number")
    return instantiate(_spec(node), _convert_="all")(optimizer)
