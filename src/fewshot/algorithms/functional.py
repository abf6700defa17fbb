"""The functional machinery under MAML's inner loop: adapted weights as plain dicts swapped into one net's
parameter slots (no clones), BatchNorm from the batch's own statistics, and the choice of strategy per device.
See fewshot.algorithms.maml for how the two strategies (vmap, loop) use it."""

from __future__ import annotations

import copy
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Weights = dict[str, torch.Tensor]
STRATEGIES = ("auto", "vmap", "loop")

# What "auto" runs on a CPU. On the 2-core development machine (torch 2.x, Omniglot Conv4-64, second
# order, python scripts/bench_maml.py --device cpu --all-strategies) the threaded loop beat both
# learn2learn's clone/adapt loop and vmap, whose grouped convolutions are slow on CPU.
CPU_STRATEGY = "loop"


def resolve_strategy(strategy: str, device: torch.device | str) -> str:
    """The inner-loop strategy that "auto" stands for on `device`; other strategies pass through."""
    if strategy not in STRATEGIES:
        raise ValueError(f"MAML strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "vmap" if torch.device(device).type == "cuda" else CPU_STRATEGY


def _batch_norm_from_batch(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """What bn(x) computes with batch statistics (no running statistics), from elementary ops.

    Two passes over x, as few as the fused kernel: one for mean and variance (var_mean), one for x * scale + shift
    with the per-channel scale and shift folded first (tiny tensors). A second-order MAML step differentiates
    this twice under vmap, and its step is bound by the number and size of kernels over the activations, so the
    textbook (x - mean) / std * weight + bias (six passes, each again in both backward passes) costs more."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + bn.eps)
    if bn.affine:
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = scale * bn.weight.view(shape)
        return torch.addcmul(bn.bias.view(shape) - mean * scale, x, scale)
    return torch.addcmul(-mean * scale, x, scale)


def _conv2d_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(x) as im2col (unfold) and one matmul. Under vmap with per-task weights this is a batched matmul where
    cuDNN would run a grouped convolution, whose backward kernels are slow at MAML's shapes (scripts/bench_maml.py
    --profile); its derivatives are matmuls and fold/unfold again, to any order."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    height = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = (conv.weight.flatten(1) @ cols).unflatten(-1, (height, width))  # (O, C*kh*kw) @ (N, C*kh*kw, L)
    return out if conv.bias is None else out + conv.bias.view(-1, 1, 1)


def _matmul_convertible(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


class _StatelessCall:
    """net(x) with its parameters replaced by the tensors in `weights` (keyed by parameter name).

    The (submodule, attribute) slot of every parameter is found once; a call swaps the given tensors into
    those slots and back. Not thread-safe (nor is functional_call): each thread needs its own net.

    decompose_batch_norm: run every BatchNorm that uses batch statistics as elementary ops instead of the
    fused kernel. Needed for second-order MAML under vmap: with torch 2.x, differentiating through the
    batched native_batch_norm backward gives wrong meta-gradients (off by ~1e-2 relative in float64; see
    pytorch/functorch#534 and tests/test_algorithms.py), while the decomposition agrees with the loop.

    conv_as_matmul: run every plain Conv2d as unfold + matmul (_conv2d_as_matmul) instead of cuDNN."""

    def __init__(self, net: nn.Module, decompose_batch_norm: bool = False, conv_as_matmul: bool = False) -> None:
        self.net = net
        self.slots = []
        for name, _ in net.named_parameters():
            module_path, _, attr = name.rpartition(".")
            self.slots.append((name, net.get_submodule(module_path), attr))
        self.batch_norms = [
            m
            for m in net.modules()
            if decompose_batch_norm and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None
        ]
        convs = [m for m in net.modules() if conv_as_matmul and _matmul_convertible(m)]
        # Modules whose forward the call replaces: an instance attribute shadows the class's forward.
        self.forwards = [(bn, _batch_norm_from_batch) for bn in self.batch_norms] + [
            (conv, _conv2d_as_matmul) for conv in convs
        ]

    def __call__(self, weights: Weights, x: torch.Tensor) -> torch.Tensor:
        originals = [module._parameters[attr] for _, module, attr in self.slots]
        try:
            for name, module, attr in self.slots:
                module._parameters[attr] = weights[name]
            for module, forward in self.forwards:
                module.forward = functools.partial(forward, module)
            return self.net(x)
        finally:
            for (_, module, attr), original in zip(self.slots, originals):
                module._parameters[attr] = original
            for module, _ in self.forwards:
                module.__dict__.pop("forward", None)


def loop_workers(strategy: str, device: torch.device, tasks: int) -> int:
    """Worker threads for the loop: one per intra-op CPU thread (at most one per task), 1 elsewhere."""
    if strategy != "loop" or device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), tasks))


def parallel_tasks(
    net: nn.Module, fn: Callable[["_StatelessCall", int], tuple], tasks: int, workers: int
) -> list[tuple]:
    """[fn(call, t) for t in range(tasks)], spread over `workers` threads with one intra-op thread each;
    every worker calls its own copy of the net (the swap in _StatelessCall mutates the module)."""
    if workers <= 1:
        call = _StatelessCall(net)
        return [fn(call, t) for t in range(tasks)]
    threads = torch.get_num_threads()

    def work(part: Sequence[int]) -> list[tuple]:
        torch.set_num_threads(1)
        call = _StatelessCall(copy.deepcopy(net))
        with torch.enable_grad():
            return [fn(call, t) for t in part]

    parts = [range(i, tasks, workers) for i in range(workers)]
    results: list = [None] * tasks
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="maml") as pool:
            for part, outputs in zip(parts, pool.map(work, parts)):
                for t, out in zip(part, outputs):
                    results[t] = out
    finally:
        # Restored once every worker is done: torch's thread count is partly process-wide, and a worker that
        # restored it while another still ran changed that one's reductions (results then varied in the last bit).
        torch.set_num_threads(threads)
    return results


def activation_elements(net: nn.Module, image_shape: Sequence[int]) -> int:
    """Elements of every leaf module's output for one image: what a forward pass keeps for backward."""
    elements = 0

    def count(module, inputs, output):
        nonlocal elements
        elements += output.numel() if isinstance(output, torch.Tensor) else 0

    handles = [m.register_forward_hook(count) for m in net.modules() if not list(m.children())]
    try:
        with torch.no_grad():  # two images: BatchNorm needs a batch; halved below
            net(torch.zeros(2, *image_shape, device=next(net.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return elements // 2


class _MetaGradient(torch.autograd.Function):
    """The mean meta-loss with its gradient computed in forward (by `run`, which frees each task graph as it
    goes); backward hands out that gradient scaled by the incoming one. Like activation checkpointing,
    forward re-enables autograd inside. Once differentiable, which is all meta-training needs."""

    @staticmethod
    def forward(ctx, run: Callable, *params: torch.Tensor):  # type: ignore[override]
        leaves = tuple(p.detach().requires_grad_() for p in params)
        with torch.enable_grad():
            loss, acc, grads = run(leaves)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(acc)
        return loss, acc

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, grad_acc: Optional[torch.Tensor]):  # type: ignore[override]
        return (None, *(grad_loss * g for g in ctx.saved_tensors))
