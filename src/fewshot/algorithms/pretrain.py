"""The pretrained baseline of MAML's sinusoid experiment (Finn, Abbeel, Levine 2017, Section 5.1, baseline (a)).

Training: one network regresses on the points of many random tasks at once (plain supervised learning, no inner
loop); the engine's Adam updates it. Here a task's support and query points are used alike. (The official code,
cbfinn/maml with --pretrain_iterations, fits the K support points of each task only.)

Test: a copy of the weights is fine-tuned on each task's K support points with eval_inner_steps plain SGD steps
of size inner_lr, and the query MSE is reported before and after every step, exactly as MAML's evaluation does:
this class is MAML with another training step, so both share the adaptation code. The paper fine-tunes the
pretrained net "using an automatically tuned step size": scripts/sinusoid.py picks inner_lr on validation tasks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, BackboneFactory, accuracy
from fewshot.algorithms.maml import MAML
from fewshot.data.base import Episode


class Pretrained(MAML):
    """backbone(out_features=ways) trained on all tasks jointly; evaluated like MAML (fine-tuned per task).

    inner_lr, eval_inner_steps: the test-time fine-tuning step size and number of SGD steps.
    loss: "mse" (regression) or "cross_entropy" (a classification fine-tuning baseline).
    strategy, chunk_size: how the test-time fine-tuning runs over tasks (see MAML).
    """

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        inner_lr: float = 0.01,
        eval_inner_steps: int = 10,
        loss: str = "mse",
        strategy: str = "auto",
        chunk_size: Optional[int] = None,
    ) -> None:
        super().__init__(
            backbone,
            ways,
            inner_lr=inner_lr,
            inner_steps=1,
            eval_inner_steps=eval_inner_steps,
            first_order=True,
            strategy=strategy,
            chunk_size=chunk_size,
            loss=loss,
        )
        self._has_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.net.modules())

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, inner_lr={self.inner_lr}, eval_inner_steps={self.eval_inner_steps}, loss={self.loss!r}"
        )

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        if not train:  # fine-tune on the support set and score the queries, as MAML's test does
            return super().forward(episode, train=False)
        x = torch.cat([episode.support_x, episode.query_x], dim=1)  # (T, n, ...): every point of every task
        y = torch.cat([episode.support_y, episode.query_y], dim=1)
        tasks, n = x.shape[:2]
        if self._has_batch_norm:  # batch statistics per task, as at test
            out = torch.func.vmap(self.net, randomness="error")(x)
        else:
            out = self.net(x.flatten(0, 1)).view(tasks, n, -1)
        if self._regression(y):
            per_task = (out - y.view(tasks, n, -1)).pow(2).flatten(1).mean(1)  # (T,)
            return AlgoOutput(loss=per_task.mean(), score=per_task.detach(), metric="mse")
        per_point = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(tasks, n)
        return AlgoOutput(loss=per_point.mean(), score=accuracy(out.detach(), y))
