"""Meta-SGD (Li, Zhou, Chen, Li 2017, arXiv 1707.09835): MAML whose inner step size is learned, one per weight.

The inner step is theta' = theta - alpha * grad, with alpha a tensor of theta's shape for every parameter,
meta-learned beside theta (so the update's size and, with negative entries, its direction are learned). The
paper adapts in one step, in meta-training and at test, and draws alpha's entries from U[0.005, 0.1].

Everything else is MAML's engine (fewshot.algorithms.maml): the vmap and threaded-loop strategies, chunking,
first order, regression. The step sizes travel to the inner loop as MAML.inner_lrs() and are leaves of the
meta-gradient like the weights, so every strategy hands them their gradient. learn2learn's
algorithms.MetaSGD is the same update; tests/test_meta_sgd.py checks the meta-gradients against it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from fewshot.algorithms.base import BackboneFactory
from fewshot.algorithms.maml import MAML


class MetaSGD(MAML):
    """Meta-SGD over a meta-batch of tasks.

    init_lr_min, init_lr_max: each step size starts uniform in [min, max] (equal ends: a constant, as
        learn2learn's MetaSGD(lr=...)).
    inner_steps, eval_inner_steps: inner steps in meta-training and at validation/test (the paper: 1 and 1).
    first_order, strategy, chunk_size, loss: as MAML. First order keeps the step sizes' own gradient (the
        query gradient times -grad), as learn2learn's MetaSGD(first_order=True) does.

    The step sizes are self.lrs, a ParameterList in the order of self.net.named_parameters().
    """

    step_size_setting = "algo.init_lr_max"  # the learned step sizes start below it

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        init_lr_min: float = 0.005,
        init_lr_max: float = 0.1,
        inner_steps: int = 1,
        eval_inner_steps: int = 1,
        first_order: bool = False,
        strategy: str = "auto",
        chunk_size: Optional[int] = None,
        loss: str = "auto",
    ) -> None:
        low, high = float(init_lr_min), float(init_lr_max)
        if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
            raise ValueError(
                f"Meta-SGD needs 0 <= init_lr_min <= init_lr_max, got init_lr_min={init_lr_min}, "
                f"init_lr_max={init_lr_max}"
            )
        super().__init__(
            backbone,
            ways,
            inner_steps=inner_steps,
            eval_inner_steps=eval_inner_steps,
            first_order=first_order,
            strategy=strategy,
            chunk_size=chunk_size,
            loss=loss,
        )
        self.inner_lr = None  # no shared step size: every inner step reads self.lrs
        self.init_lr_min, self.init_lr_max = low, high
        self.lrs = nn.ParameterList(
            nn.Parameter(torch.empty_like(p).uniform_(low, high)) for p in self.net.parameters()
        )

    def inner_lrs(self) -> tuple[torch.Tensor, ...]:
        return tuple(self.lrs)

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, init_lr=U[{self.init_lr_min}, {self.init_lr_max}], inner_steps={self.inner_steps}, "
            f"eval_inner_steps={self.eval_inner_steps}, first_order={self.first_order}, "
            f"strategy={self.strategy!r}, chunk_size={self.chunk_size}, loss={self.loss!r}"
        )
