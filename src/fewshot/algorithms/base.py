"""What every algorithm answers: one call over a whole meta-batch of tasks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Optional

import torch
from torch import nn

from fewshot.data.base import Episode

# A backbone factory with the dataset's in_channels and image_size already bound:
# backbone(out_features=ways) gives a classifier, backbone(out_features=None) an embedding.
BackboneFactory = Callable[..., nn.Module]


@dataclass
class AlgoOutput:
    """What an algorithm returns for a meta-batch: the loss, a per-task score and its metric's name (see
    fewshot.metrics: "acc" for classification, "mse" for regression), and optionally a per-task score along a
    second axis, named by step_kind: "step" (MAML: before adaptation and after each inner step; results.json's
    step_acc) or "instance" (MANN: at the 1st, 2nd, ... instance of each class in a sequence; instance_acc)."""

    loss: torch.Tensor  # scalar, mean over tasks; differentiable w.r.t. the meta-parameters in training
    score: torch.Tensor  # (T,) per-task query score, detached: accuracy in [0, 1], or MSE
    metric: str = "acc"
    step_score: Optional[torch.Tensor] = None  # (T, inner_steps + 1): before adaptation and after each step
    step_kind: str = "step"  # what step_score's axis is: "step" or "instance" (results.json: <kind>_<metric>)
    logits: Optional[torch.Tensor] = None  # (T, queries, ways) final query logits at test: eval.ensemble averages them

    def per_task(self) -> torch.Tensor:
        return self.score

    def per_step(self) -> Optional[torch.Tensor]:
        return self.step_score

    # Named views, for readers who know which metric they asked for (tests, benchmarks).
    @property
    def acc(self) -> Optional[torch.Tensor]:
        return self.score if self.metric == "acc" else None

    @property
    def step_acc(self) -> Optional[torch.Tensor]:
        return self.step_score if self.metric == "acc" else None

    @property
    def mse(self) -> Optional[torch.Tensor]:
        return self.score if self.metric == "mse" else None

    @property
    def step_mse(self) -> Optional[torch.Tensor]:
        return self.step_score if self.metric == "mse" else None


class Algorithm(nn.Module):
    """Base class. Subclasses implement forward(episode, train) -> AlgoOutput.

    train=True: the loss carries the graph for the outer (meta) update.
    train=False: validation/test; no meta-gradient is needed (inner loops may still need autograd).
    """

    # The number of ways the model is built for, when it has a classifier head (MAML); None when any
    # number of ways works (metric methods), so they can train 60-way and test 5-way.
    fixed_ways: Optional[int] = None
    # Whether forward(train=False) fills AlgoOutput.logits, which eval.ensemble averages across checkpoints.
    reports_logits: bool = False
    # Whether the backbone may keep BatchNorm running statistics (backbone.running_stats): only where the
    # algorithm runs it as a module (protonet, matching, siamese), not through a functional forward.
    running_stats_ok: bool = False
    # Whether device.channels_last=null puts its convolution weights in NHWC on a CPU: where
    # scripts/bench_channels_last.py measured its presets' steps faster so (protonet, matching, siamese, reptile, anil),
    # not where it was no faster (MAML 1.02x, Meta-SGD 0.98x, MAML++ 0.94x, Meta-LSTM 1.00x training steps).
    cpu_channels_last: bool = False
    # The setting that sets its inner-loop step size, which a diverging run's message names beside trainer.meta_lr.
    step_size_setting: Optional[str] = None
    # The training iteration a CUDA graph of the step is being captured for (set by engine.steps.GraphStep), for
    # algorithms whose graph_phase changes: what they read instead of a device counter while capturing.
    graph_iteration: Optional[int] = None

    def graph_phase(self, iteration: int) -> Hashable:
        """The host-side control flow of training iteration `iteration`'s (1-based) step where it changes during a
        run, which a captured graph would freeze: GraphStep captures the step afresh when the value changes. None
        (the default): the same flow every iteration."""
        return None

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:  # pragma: no cover - interface
        raise NotImplementedError


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Fraction of correct argmax predictions over the last-but-one dim: (..., N, C), (..., N) -> (...)."""
    return (logits.argmax(-1) == labels).float().mean(-1)
