"""Prototypical Networks (Snell, Swersky, Zemel 2017): squared Euclidean distance to class means."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.functional import resolve_strategy
from fewshot.data.base import Episode
from fewshot.models.backbones import tracks_running_stats


def map_tasks(net: nn.Module, x: torch.Tensor, per_task: Optional[bool] = None) -> torch.Tensor:
    """net over each task's images, all tasks at once: (T, N, C, H, W) -> (T, N, D), BatchNorm's batch statistics
    those of each task's N images.

    per_task: a loop of one call per task (True) or torch.func.vmap over the tasks (False), the same numbers; None
    picks what the MAML family's strategy "auto" picks on the device (resolve_strategy: the loop on a CPU, where
    scripts/bench_channels_last.py --tasks measured vmap's test steps 1.8-2.9x slower and its training steps
    1.16-1.67x, 2-core CPU, 2026-11-28; vmap on CUDA, where the shared weights make every conv one batched call),
    and the loop wherever BatchNorm updates running statistics, which vmap cannot batch."""
    running = net.training and tracks_running_stats(net)
    if per_task is None:
        per_task = resolve_strategy("auto", x.device) == "loop" or running
    elif not per_task and running:
        raise ValueError("map_tasks(per_task=False): vmap cannot update BatchNorm's running statistics in train()")
    if per_task:
        return torch.stack([net(task) for task in x])
    return torch.func.vmap(net, randomness="different")(x)


def embed_tasks(
    net: nn.Module, support_x: torch.Tensor, query_x: torch.Tensor, per_task: Optional[bool] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Embed each task's support and query images in one pass per task, all tasks at once (map_tasks).

    (T, S, C, H, W), (T, Q, C, H, W) -> (T, S, D), (T, Q, D). As in Snell et al.'s code, a task's support
    and query images go through the net together, so BatchNorm's batch statistics are those of the task."""
    support = support_x.shape[1]
    z = map_tasks(net, torch.cat([support_x, query_x], dim=1), per_task)  # (T, S+Q, D)
    return z[:, :support], z[:, support:]


def one_hot(labels: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """(T, N) int64 -> (T, N, ways) one-hot rows in dtype."""
    return F.one_hot(labels, ways).to(dtype)


class ProtoNet(Algorithm):
    """logits(query, class c) = -||f(query) - mean of f(support of class c)||^2; cross-entropy on the query."""

    running_stats_ok = True  # embed_tasks runs the backbone as a module
    # NHWC on a CPU: 60-way training steps 1.24-1.31x faster, tests 1.46-1.71x (bench_channels_last.py)
    cpu_channels_last = True

    def __init__(self, backbone: BackboneFactory, ways: int) -> None:
        super().__init__()
        self.net = backbone(out_features=None)
        self.ways = ways

    def extra_repr(self) -> str:
        return f"ways={self.ways}"

    def logits(
        self, support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, ways: Optional[int] = None
    ) -> torch.Tensor:
        """Embeddings (T, S, D), labels (T, S), (T, Q, D) -> logits (T, Q, ways); ways defaults to the constructor's."""
        ways = ways or self.ways
        onehot = one_hot(support_y, ways, support.dtype)  # (T, S, ways)
        counts = onehot.sum(1).clamp_min(1).unsqueeze(-1)  # (T, ways, 1)
        prototypes = onehot.transpose(1, 2) @ support / counts  # (T, ways, D)
        # ||q - p||^2 written out, not torch.cdist: exact for the tests, and cdist's backward is slower.
        return -((query.unsqueeze(2) - prototypes.unsqueeze(1)) ** 2).sum(-1)

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        with contextlib.nullcontext() if train else torch.no_grad():
            support, query = embed_tasks(self.net, episode.support_x, episode.query_x)
            logits = self.logits(support, episode.support_y, query, episode.num_ways())  # (T, Q, ways)
            loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        return AlgoOutput(loss=loss, score=accuracy(logits.detach(), episode.query_y))
