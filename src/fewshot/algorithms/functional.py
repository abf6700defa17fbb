"""The functional machinery under MAML's inner loop: adapted weights as plain dicts swapped into one net's
parameter slots (no clones), BatchNorm from the batch's own statistics, and the choice of strategy per device.
See fewshot.algorithms.maml for how the two strategies (vmap, loop) use it."""

from __future__ import annotations

import copy
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from fewshot.algorithms.conv_forms import CONV_FORMS

Weights = dict[str, torch.Tensor]
STRATEGIES = ("auto", "vmap", "loop")

# What "auto" runs on a CPU. On the 2-core development machine (torch 2.x, Omniglot Conv4-64, second
# order, python scripts/bench_maml.py --device cpu --all-strategies) the threaded loop beat both
# learn2learn's clone/adapt loop and vmap, whose grouped convolutions are slow on CPU.
CPU_STRATEGY = "loop"


def resolve_strategy(strategy: str, device: torch.device | str) -> str:
    """The inner-loop strategy that "auto" stands for on `device`; other strategies pass through."""
    if strategy not in STRATEGIES:  # the constructors name their algorithm (check_inner_loop); this guards the rest
        raise ValueError(f"the inner-loop strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    return "vmap" if torch.device(device).type == "cuda" else CPU_STRATEGY


def check_inner_loop(
    algo: str, inner_steps: int, eval_inner_steps: Optional[int] = None, strategy: Optional[str] = None
) -> None:
    """The inner-loop settings the MAML family's constructors check (those they have), the algorithm named in the
    message."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"{algo} strategy must be one of {STRATEGIES}, got {strategy!r}")
    if eval_inner_steps is None and inner_steps < 1:
        raise ValueError(f"{algo} needs inner_steps >= 1, got {inner_steps}")
    if eval_inner_steps is not None and (inner_steps < 1 or eval_inner_steps < 0):
        raise ValueError(
            f"{algo} needs inner_steps >= 1 and eval_inner_steps >= 0, got {inner_steps}, {eval_inner_steps}"
        )


def _batch_norm_from_batch(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """What bn(x) computes with batch statistics (no running statistics), from elementary ops.

    Two passes over x, as few as the fused kernel: one for mean and variance (var_mean), one for x * scale + shift
    with the per-channel scale and shift folded first (tiny tensors). A second-order MAML step differentiates
    this twice under vmap, and its step is bound by the number and size of kernels over the activations, so the
    textbook (x - mean) / std * weight + bias (six passes, each again in both backward passes) costs more."""
    return _normalize(x, bn.weight, bn.bias, bn.eps)


def _normalize(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    """(x - mean) * rsqrt(var + eps) * weight + bias over the batch statistics, as var_mean and one addcmul."""
    dims, shape = _channel_dims(x)
    var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps)
    if weight is None:
        return torch.addcmul(-mean * scale, x, scale)
    scale = scale * weight.view(shape)
    return torch.addcmul(bias.view(shape) - mean * scale, x, scale)


class _BatchNormFromBatch(torch.autograd.Function):
    """What _batch_norm_from_batch computes, with its backward written out in differentiable ops: d(input) is
    two fused multiply-adds over the activations with per-channel factors, from the input and the incoming
    gradient alone. Differentiated a second time, this keeps no activation-sized intermediates beyond those two,
    where the autograd of the decomposition keeps (x - mean) and its products (the second-order vmap step's
    memory beyond learn2learn's: scripts/bench_maml.py's memory). The statistics are recomputed from the input
    in backward, so that their dependence on it is differentiated too."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias, eps):  # type: ignore[override]
        return _normalize(x, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, _, eps = inputs
        ctx.save_for_backward(x, weight)
        ctx.eps = eps

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dims, shape = _channel_dims(x)
        var, mean = torch.var_mean(x, dims, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + ctx.eps)
        g_mean = g.mean(dims, keepdim=True)
        g_xhat = rstd * ((g * x).mean(dims, keepdim=True) - mean * g_mean)  # mean of g * (x - mean) * rstd
        scale = rstd * weight.view(shape)
        k = g_xhat * rstd * scale
        # scale * (g - mean(g) - xhat * mean(g * xhat)), with xhat = (x - mean) * rstd folded into per-channel factors
        dx = torch.addcmul(torch.addcmul(k * mean - scale * g_mean, g, scale), x, -k)
        n = x.numel() // x.shape[1]
        return dx, (g_xhat * n).view(-1), (g_mean * n).view(-1), None


def _channel_dims(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """The dims BatchNorm reduces over (all but channels, dim 1) and the shape that broadcasts a channel vector."""
    return [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)


def _batch_norm_function(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    if not bn.affine:
        return _batch_norm_from_batch(bn, x)
    return _BatchNormFromBatch.apply(x, bn.weight, bn.bias, bn.eps)


def _batch_norm_forward(form: str) -> Optional[Callable]:
    """The forward of a batch-statistics BatchNorm in `form` (None: the module's own). Looked up per call, not at
    import, so that scripts/bench_maml.py can time another decomposition in its place."""
    return {"native": None, "decomposed": _batch_norm_from_batch, "function": _batch_norm_function}[form]


def _batch_norm_from_rows(rows: int) -> Callable:
    """A batch-statistics BatchNorm's forward that normalises the rows after the first `rows` with those rows'
    statistics, as running statistics gathered over them would (the unbiased variance), and the first `rows` with
    their own batch statistics, as in training: a support set's pass in train(), then its queries' in eval()."""

    def forward(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
        dims, shape = _channel_dims(x)
        support, rest = x[:rows], x[rows:]
        var, mean = torch.var_mean(support, dims, correction=0, keepdim=True)
        n = support.numel() // x.shape[1]  # values per channel
        own, running = torch.rsqrt(var + bn.eps), torch.rsqrt(var * (n / max(n - 1, 1)) + bn.eps)
        out = torch.cat([(support - mean) * own, (rest - mean) * running])
        return out * bn.weight.view(shape) + bn.bias.view(shape) if bn.affine else out

    return forward


def _batch_statistics(m: nn.Module) -> bool:
    """A BatchNorm that normalises with its batch's statistics (no running statistics)."""
    return isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is None


def _plain_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


class _StatelessCall:
    """net(x) with its parameters replaced by the tensors in `weights` (keyed by parameter name).

    The (submodule, attribute) slot of every parameter is found once; a call swaps the given tensors into
    those slots and back. Not thread-safe (nor is functional_call): each thread needs its own net.

    batch_norm: how every BatchNorm that uses batch statistics runs: "native" (the fused kernel), "decomposed"
    (_batch_norm_from_batch, elementary ops) or "function" (_BatchNormFromBatch, the same with its backward written
    out). A decomposition is needed for second-order MAML under vmap: with torch 2.x, differentiating through the
    batched native_batch_norm backward gives wrong meta-gradients (off by ~1e-2 relative in float64; see
    pytorch/functorch#534 and tests/test_algorithms.py), while the decomposition agrees with the loop.

    conv: how every plain Conv2d runs, a key of CONV_FORMS ("cudnn": as the module does).

    stats_rows: every batch-statistics BatchNorm normalises the rows after the first `stats_rows` with those rows'
    statistics (_batch_norm_from_rows), e.g. a task's queries with its support images'; instead of batch_norm's."""

    def __init__(
        self, net: nn.Module, batch_norm: str = "native", conv: str = "cudnn", stats_rows: Optional[int] = None
    ) -> None:
        self.net = net
        self.slots = []
        for name, _ in net.named_parameters():
            module_path, _, attr = name.rpartition(".")
            self.slots.append((name, net.get_submodule(module_path), attr))
        if stats_rows is not None and batch_norm != "native":
            raise ValueError(f"_StatelessCall: stats_rows replaces batch_norm's form; got both ({batch_norm!r})")
        bn_forward = _batch_norm_forward(batch_norm) if stats_rows is None else _batch_norm_from_rows(stats_rows)
        self.batch_norms = [m for m in net.modules() if bn_forward is not None and _batch_statistics(m)]
        conv_forward = CONV_FORMS[conv]
        convs = [m for m in net.modules() if conv_forward is not None and _plain_conv(m)]
        # Modules whose forward the call replaces: an instance attribute shadows the class's forward.
        self.forwards = [(bn, bn_forward) for bn in self.batch_norms] + [(module, conv_forward) for module in convs]

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


def inner_loop_graph_bytes(
    net: nn.Module,
    image_shape: Sequence[int],
    support: int,
    query: int,
    steps: int,
    second_order: bool,
    query_passes: int,
    in_flight: int,
) -> int:
    """A rough upper estimate of a meta-training step's autograd graph, in bytes (float32). Each inner step keeps
    the support pass's activations and, second order, its backward pass (the double backward needs both); each query
    pass on adapted weights adds its own and its backward; `in_flight` tasks at once."""
    per_image = activation_elements(net, image_shape)
    per_task = steps * support * per_image * (2 if second_order else 1) + 2 * query * per_image * query_passes
    return 4 * per_task * in_flight


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
