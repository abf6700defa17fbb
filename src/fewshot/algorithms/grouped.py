"""A backbone run over T tasks at once, each with its own weights, as one network whose channels are grouped by
task: no vmap, no per-task loop.

Images (T, N, C, H, W) enter as (N, T*C, H, W), task-major channels. A Conv2d becomes one convolution with groups=T;
a BatchNorm from batch statistics a BatchNorm over the T*C channels, whose statistics are per task and channel, as
they are per task; a Linear one batched matmul over the tasks; ReLU, pooling, flattening and the spatial mean act
per channel and need nothing. The result is each task's own forward pass (tests/test_algorithms.py).

MAML's vmap step uses it for the query pass of meta-training (VmapForms.grouped_query): under vmap every convolution
copies its input into this same layout and keeps the copy for backward, and BatchNorm with per-task weights keeps
its normalised input besides, so the query pass, the largest, kept about twice what learn2learn keeps
(scripts/bench_maml.py --memory). Here it keeps what a per-task forward keeps."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.base import accuracy
from fewshot.models.backbones import MLP, Conv4

# Modules without parameters that act per channel (or per feature) and so need no change.
_CHANNELWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.MaxPool2d, nn.AvgPool2d)


def supports(net: nn.Module) -> bool:
    """Whether GroupedCall runs `net` exactly: fewshot's Conv4 and MLP backbones (their forward only takes the
    spatial mean or flattens), built from plain convolutions, linear layers, batch-statistics BatchNorm and
    channel-wise modules."""
    if type(net) not in (Conv4, MLP):
        return False
    for m in net.modules():
        if isinstance(m, (Conv4, MLP, nn.Sequential, nn.Linear, *_CHANNELWISE)):
            continue
        if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
            continue
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros":
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None:
            continue
        return False
    return True


def _conv(tasks: int, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    w, b = conv.weight, conv.bias  # (T, O, C, kh, kw), (T, O)
    return F.conv2d(
        x, w.flatten(0, 1), None if b is None else b.flatten(), conv.stride, conv.padding, conv.dilation, tasks
    )


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    w = None if bn.weight is None else bn.weight.flatten()
    b = None if bn.bias is None else bn.bias.flatten()
    return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)


def _linear(tasks: int, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    n = x.shape[0]
    x = x.view(n, tasks, -1).transpose(0, 1)  # (T, N, in)
    w, b = linear.weight.transpose(1, 2), linear.bias  # (T, in, out), (T, out)
    out = torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)
    return out.transpose(0, 1).reshape(n, -1)  # (N, T*out)


class GroupedCall:
    """net over T tasks with per-task weights: call(weights, x) with weights {name: (T, *shape)} and x (T, N, ...)
    returns (T, N, out). Like functional._StatelessCall it swaps the tensors into the parameter slots for the call
    (and the module forwards for grouped ones); not thread-safe."""

    def __init__(self, net: nn.Module) -> None:
        if not supports(net):
            raise ValueError(f"GroupedCall does not support {type(net).__name__} ({net.__class__.__module__})")
        self.net = net
        self.slots = []
        for name, _ in net.named_parameters():
            module_path, _, attr = name.rpartition(".")
            self.slots.append((name, net.get_submodule(module_path), attr))
        grouped = (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)
        self.modules = [m for m in net.modules() if isinstance(m, grouped)]

    def __call__(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tasks, n = x.shape[:2]
        h = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])  # (N, T*C, ...)
        originals = [module._parameters[attr] for _, module, attr in self.slots]
        try:
            for name, module, attr in self.slots:
                module._parameters[attr] = weights[name]
            for m in self.modules:
                if isinstance(m, nn.Conv2d):
                    m.forward = functools.partial(_conv, tasks, m)
                elif isinstance(m, nn.Linear):
                    m.forward = functools.partial(_linear, tasks, m)
                else:
                    m.forward = functools.partial(_batch_norm, m)
            out = self.net(h)  # (N, T*out)
        finally:
            for (_, module, attr), original in zip(self.slots, originals):
                module._parameters[attr] = original
            for m in self.modules:
                m.__dict__.pop("forward", None)
        return out.view(n, tasks, -1).transpose(0, 1)


def query_losses(
    net: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, regression: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-task query loss (mean cross-entropy, or mean squared error for regression) and score (accuracy, or the
    same MSE), (T,) each, of the tasks' adapted weights {name: (T, *shape)} on their query sets x (T, N, ...)."""
    out = GroupedCall(net)(weights, x)  # (T, N, out)
    if regression:
        losses = (out - y).pow(2).flatten(1).mean(1)
        return losses, losses.detach()
    losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none").view(len(out), -1).mean(1)
    return losses, accuracy(out.detach(), y)
