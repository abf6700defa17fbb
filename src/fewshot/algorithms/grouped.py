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

import torch
import torch.nn.functional as F
from torch import nn

from fewshot.algorithms.conv_forms import _FpropConv2d
from fewshot.algorithms.functional import _batch_statistics, _plain_conv, _StatelessCall
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
        if _plain_conv(m) or _batch_statistics(m):
            continue
        return False
    return True


# The forwards of the modules that hold weights, on (N, T*C, ...) inputs; T is their weights' leading dim.
def _conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    w, b = conv.weight, conv.bias  # (T, O, C, kh, kw), (T, O)
    return F.conv2d(
        x, w.flatten(0, 1), None if b is None else b.flatten(), conv.stride, conv.padding, conv.dilation, len(w)
    )


def _conv_fprop(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:  # the same, input gradients as forward convs
    w, b = conv.weight, conv.bias
    spec = (conv.stride, conv.padding, conv.dilation, len(w))
    return _FpropConv2d.apply(x, w.flatten(0, 1), None if b is None else b.flatten(), spec)


def _batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    w = None if bn.weight is None else bn.weight.flatten()
    b = None if bn.bias is None else bn.bias.flatten()
    return F.batch_norm(x, None, None, w, b, True, 0.0, bn.eps)


def _linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    n, w, b = x.shape[0], linear.weight.transpose(1, 2), linear.bias  # (T, in, out), (T, out)
    x = x.view(n, len(w), -1).transpose(0, 1)  # (T, N, in)
    out = torch.bmm(x, w) if b is None else torch.baddbmm(b.unsqueeze(1), x, w)
    return out.transpose(0, 1).reshape(n, -1)  # (N, T*out)


class GroupedCall(_StatelessCall):
    """net over T tasks with per-task weights: call(weights, x) with weights {name: (T, *shape)} and x (T, N, ...)
    returns (T, N, out). _StatelessCall's swap, with the grouped forwards above; not thread-safe.
    conv: "cudnn" (F.conv2d) or "fprop" (conv_forms: input gradients as forward convolutions, not grouped dgrads)."""

    def __init__(self, net: nn.Module, conv: str = "cudnn") -> None:
        if not supports(net):
            raise ValueError(f"GroupedCall does not support {type(net).__name__} ({net.__class__.__module__})")
        if conv not in ("cudnn", "fprop"):
            raise ValueError(f"GroupedCall's conv must be 'cudnn' or 'fprop', got {conv!r}")
        super().__init__(net)
        conv_forward = _conv_fprop if conv == "fprop" else _conv
        self.forwards = [
            (m, conv_forward if isinstance(m, nn.Conv2d) else _linear if isinstance(m, nn.Linear) else _batch_norm)
            for m in net.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) or _batch_statistics(m)
        ]

    def __call__(self, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        tasks, n = x.shape[:2]
        out = super().__call__(weights, x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:]))
        return out.view(n, tasks, -1).transpose(0, 1)  # (N, T*out) -> (T, N, out)
