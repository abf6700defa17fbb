"""What every algorithm answers: one call over a whole meta-batch of tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from fewshot.data.base import Episode

# A backbone factory with the dataset's in_channels and image_size already bound:
# backbone(out_features=ways) gives a classifier, backbone(out_features=None) an embedding.
BackboneFactory = Callable[..., nn.Module]


@dataclass
class AlgoOutput:
    """Classification fills acc (and step_acc); regression (MAML's sinusoid) fills mse (and step_mse)."""

    loss: torch.Tensor  # scalar, mean over tasks; differentiable w.r.t. the meta-parameters in training
    acc: Optional[torch.Tensor] = None  # (T,) query accuracy per task, detached, in [0, 1]
    step_acc: Optional[torch.Tensor] = None  # (T, inner_steps + 1) query accuracy after each inner step (MAML)
    mse: Optional[torch.Tensor] = None  # (T,) query mean squared error per task, detached
    step_mse: Optional[torch.Tensor] = None  # (T, inner_steps + 1) query MSE before and after each inner step

    @property
    def metric(self) -> str:
        """The name of the per-task metric this output carries: acc (higher is better) or mse (lower)."""
        return "acc" if self.acc is not None else "mse"

    def per_task(self) -> torch.Tensor:
        return self.acc if self.acc is not None else self.mse

    def per_step(self) -> Optional[torch.Tensor]:
        return self.step_acc if self.acc is not None else self.step_mse


class Algorithm(nn.Module):
    """Base class. Subclasses implement forward(episode, train) -> AlgoOutput.

    train=True: the loss carries the graph for the outer (meta) update.
    train=False: validation/test; no meta-gradient is needed (inner loops may still need autograd).
    """

    # The number of ways the model is built for, when it has a classifier head (MAML); None when any
    # number of ways works (metric methods), so they can train 60-way and test 5-way.
    fixed_ways: Optional[int] = None

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:  # pragma: no cover - interface
        raise NotImplementedError


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions over the last-but-one dim: (..., N, C), (..., N) -> (...)."""
    return (logits.argmax(-1) == labels).float().mean(-1)
