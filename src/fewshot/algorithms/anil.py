"""ANIL, Almost No Inner Loop (Raghu, Raghu, Bengio, Vinyals, ICLR 2020, arXiv 1909.09157): MAML whose inner loop
adapts only the linear head; the body (every layer before it) is meta-learned by the outer loop alone.

Because the inner loop leaves the body as it is, each task's images go through the body once, not once per inner
step: the support and query images in two passes per task (BatchNorm's batch statistics those of the support set
and of the query set, as MAML's support and query passes have them), then every inner step of every task is a
batched matrix product on those features. The head's per-task weights are (tasks, ways, D) tensors, and one
autograd.grad of the summed per-task support losses gives every task its own head gradient at once.

Second order by default: the meta-gradient flows through the head's inner gradients into the head and, through
the support features, into the body. first_order=True treats the inner gradients as constants (as learn2learn's
MAML(head, first_order=True)), so the body learns from the query loss alone. The inner loss is each task's mean
cross-entropy, as fewshot's MAML (cbfinn/maml's code, on which the paper's builds, sums over the support images
and divides by the shots: see the MAML presets on what that means for the step size).

learn2learn has no ANIL class; its ANIL example wraps the head in l2l.algorithms.MAML and runs the body outside
it. tests/test_anil.py checks the meta-gradients against that wrapper fed with separate support and query passes
(the example itself passes a whole task through the body at once, so its BatchNorm statistics mix the two sets).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.functional import check_inner_loop
from fewshot.algorithms.protonet import map_tasks
from fewshot.data.base import Episode


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A linear head per task: (T, N, D) features, (T, ways, D) weights, (T, ways) biases -> (T, N, ways)."""
    return torch.baddbmm(bias.unsqueeze(1), features, weight.transpose(1, 2))


class ANIL(Algorithm):
    """backbone(out_features=ways) split into its body and its linear head; the inner loop adapts the head only.

    inner_lr, inner_steps: the inner SGD step size and number of steps in meta-training.
    eval_inner_steps: inner steps at validation/test, where step_acc is reported (before adapting and after each).
    first_order: the head's inner gradients treated as constants.
    strategy: how the body runs over the tasks: "loop" (a call per task), "vmap", or "auto" (the loop on a CPU,
        vmap on CUDA, as fewshot.algorithms.protonet.map_tasks picks).
    """

    step_size_setting = "algo.inner_lr"
    # Its Omniglot 20-way presets' training and test steps 1.13-1.14x and 1.27-1.42x faster on a 2-core CPU
    # (scripts/bench_channels_last.py, one thread beside a training run): the body runs as a module, as ProtoNets'.
    # Unmeasured for the miniImageNet presets (84x84, max-pool), which take it too.
    cpu_channels_last = True

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        check_inner_loop("ANIL", inner_steps, eval_inner_steps, strategy)
        net = backbone(out_features=ways)
        head = getattr(net, "head", None)
        if not isinstance(head, nn.Linear):
            raise ValueError(
                f"ANIL adapts a linear head, and this backbone ({type(net).__name__}) has none: pick one of "
                "fewshot's (conv4, conv4_pool, mlp, koch)"
            )
        net.head = None  # the body now returns its features (the backbones' out_features=None form)
        self.body, self.head = net, head  # the head keeps the backbone's own initialisation
        self.ways = ways
        self.fixed_ways = ways
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps)
        self.first_order = bool(first_order)
        self.strategy = strategy

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"eval_inner_steps={self.eval_inner_steps}, first_order={self.first_order}, strategy={self.strategy!r}"
        )

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        per_task = {"auto": None, "loop": True, "vmap": False}[self.strategy]
        return map_tasks(self.body, x, per_task)

    def _inner_step(self, features, labels, weight, bias, create_graph: bool):
        """One SGD step of every task's head on its support loss (each task's mean cross-entropy)."""
        logits = head_logits(features, weight, bias)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / labels.shape[1]
        g_weight, g_bias = torch.autograd.grad(loss, (weight, bias), create_graph=create_graph)
        return weight - self.inner_lr * g_weight, bias - self.inner_lr * g_bias

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        tasks = episode.tasks
        second_order = train and not self.first_order
        with contextlib.nullcontext() if second_order else torch.no_grad():  # first order: no gradient via support
            support = self._features(episode.support_x)
        with contextlib.nullcontext() if train else torch.no_grad():
            query = self._features(episode.query_x)
        weight = self.head.weight.expand(tasks, -1, -1)  # (T, ways, D): each task's own copy to adapt
        bias = self.head.bias.expand(tasks, -1)
        step_acc = []  # at test: the query accuracy before adapting and after each step
        with torch.enable_grad():  # the inner loop differentiates, also when a caller evaluates under no_grad
            if not train:
                weight, bias = weight.detach().requires_grad_(), bias.detach().requires_grad_()
            for _ in range(self.inner_steps if train else self.eval_inner_steps):
                if not train:
                    step_acc.append(accuracy(head_logits(query, weight, bias).detach(), episode.query_y))
                weight, bias = self._inner_step(support, episode.support_y, weight, bias, second_order)
        with torch.enable_grad() if train else torch.no_grad():
            logits = head_logits(query, weight, bias)
            loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())
        acc = accuracy(logits.detach(), episode.query_y)
        if train:
            return AlgoOutput(loss=loss, score=acc)
        return AlgoOutput(loss=loss, score=acc, step_score=torch.stack([*step_acc, acc], dim=1))
