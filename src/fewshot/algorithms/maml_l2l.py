"""MAML through learn2learn's MAML wrapper (clone, adapt, task by task): the trusted reference.

The same algorithm as fewshot.algorithms.maml.MAML, and the same state_dict keys (the classifier is
self.net in both), so a checkpoint of one loads into the other. The learn2learn wrapper is built around
self.net at every call instead of being registered as a submodule, which would store the weights twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.functional import check_inner_loop
from fewshot.data.base import Episode


class MAMLL2L(Algorithm):
    """MAML via learn2learn.algorithms.MAML. Arguments as fewshot.algorithms.maml.MAML (without strategy)."""

    step_size_setting = "algo.inner_lr"

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        first_order: bool = False,
    ) -> None:
        super().__init__()
        check_inner_loop("MAML", inner_steps, eval_inner_steps)
        self.net = backbone(out_features=ways)
        self.ways = ways
        self.fixed_ways = ways  # the classifier head has exactly `ways` outputs
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps)
        self.first_order = bool(first_order)

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"eval_inner_steps={self.eval_inner_steps}, first_order={self.first_order}"
        )

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        # At test no meta-gradient is needed: adapt first-order (no create_graph).
        import learn2learn as l2l  # here, not at module import: it takes seconds, and schemas import this module

        maml = l2l.algorithms.MAML(self.net, lr=self.inner_lr, first_order=self.first_order or not train)
        steps = self.inner_steps if train else self.eval_inner_steps
        losses, accs, step_accs = [], [], []
        with torch.enable_grad():
            for support_x, support_y, query_x, query_y in zip(
                episode.support_x, episode.support_y, episode.query_x, episode.query_y
            ):
                learner = maml.clone()
                per_step = []
                for _ in range(steps):
                    if not train:
                        with torch.no_grad():
                            per_step.append(accuracy(learner(query_x), query_y))
                    learner.adapt(F.cross_entropy(learner(support_x), support_y))
                if train:
                    logits = learner(query_x)
                else:
                    with torch.no_grad():
                        logits = learner(query_x)
                losses.append(F.cross_entropy(logits, query_y))
                accs.append(accuracy(logits.detach(), query_y))
                per_step.append(accs[-1])
                step_accs.append(torch.stack(per_step))
        loss = torch.stack(losses).mean()
        if not train:
            return AlgoOutput(loss=loss.detach(), score=torch.stack(accs), step_score=torch.stack(step_accs))
        return AlgoOutput(loss=loss, score=torch.stack(accs))
