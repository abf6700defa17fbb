"""MAML (Finn, Abbeel, Levine 2017) with a functional inner loop.

The network lives once, as self.net, and is never cloned: adapted weights are a plain dict
{name: tensor}, and a forward pass with them swaps those tensors into the net's parameter slots for the
duration of the call (what torch.func.functional_call does, minus its per-call checks). Two strategies
run the same per-task code (_task):

- "vmap": torch.func.vmap over the tasks, inner gradients from torch.func.grad. After the first inner
  step the weights differ per task, so every conv becomes one grouped conv over the meta-batch: few, large
  kernels, which is what a GPU wants. self.forms (fewshot.algorithms.vmap_forms) picks how its passes run.
- "loop": task by task, inner gradients from torch.autograd.grad (create_graph for second order). On a
  CPU with n > 1 intra-op threads the tasks are spread over n worker threads with one intra-op thread each,
  and each task's meta-gradient is taken as soon as the task is done (so only n task graphs are alive):
  small conv and BatchNorm kernels split poorly over threads, and a busy machine stalls every
  multi-threaded kernel at its barrier, while independent tasks need no synchronisation at all.

"auto" picks vmap on CUDA and loop on CPU, where scripts/bench_maml.py measured it fastest (see CPU_STRATEGY).

Second order by default: the meta-gradient flows through the inner gradients. first_order=True treats the
inner gradients as constants (FOMAML), as learn2learn's MAML(first_order=True) does: the adapted weights
are theta - lr * stop_gradient(g), so the meta-gradient is the query gradient at the adapted weights.

BatchNorm: the backbones use batch statistics in training and at test (track_running_stats=False), as the
MAML paper does; nothing here switches modes. Backbones with buffers that change in forward (running
statistics) are not supported by the functional inner loop.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from fewshot.algorithms import grouped
from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.functional import (  # noqa: F401  (STRATEGIES: re-exported)
    STRATEGIES,
    Weights,
    _MetaGradient,
    _StatelessCall,
    check_inner_loop,
    inner_loop_graph_bytes,
    loop_workers,
    parallel_tasks,
    resolve_strategy,
)
from fewshot.algorithms.vmap_forms import VmapForms
from fewshot.data.base import Episode

# auto: from the task source's targets, MSE for real-valued ones (regression), cross-entropy for class labels.
LOSSES = ("auto", "cross_entropy", "mse")


class MAML(Algorithm):
    """Model-Agnostic Meta-Learning over a meta-batch of tasks.

    backbone: factory; backbone(out_features=ways) is the classifier that is adapted (self.net).
    inner_lr, inner_steps: the inner SGD step size and number of steps in meta-training.
    eval_inner_steps: inner steps at validation/test (train=False), where step_acc is reported.
    first_order: FOMAML (inner gradients treated as constants).
    strategy: "loop", "vmap" or "auto" (see the module docstring).
    loss: "cross_entropy" (classification: acc/step_acc) or "mse" (regression, MAML's sinusoid: the inner and
        outer losses are the mean squared error, and the output carries mse/step_mse, the per-task query MSE).
    chunk_size: tasks whose graphs may be alive together. When it is smaller than the meta-batch, meta-
        training takes each chunk's meta-gradient inside forward and frees its graph before the next chunk,
        so second-order memory is bounded by chunk_size tasks; loss.backward() then hands out the stored
        gradient. At test it is vmap's chunk size. None: the whole meta-batch at once. The threaded CPU
        loop already holds one task per worker and ignores it.
    """

    step_size_setting = "algo.inner_lr"

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int = 10,
        first_order: bool = False,
        strategy: str = "auto",
        chunk_size: Optional[int] = None,
        loss: str = "auto",
    ) -> None:
        super().__init__()
        name = type(self).__name__  # MAML, MetaSGD, Pretrained
        check_inner_loop(name, inner_steps, eval_inner_steps, strategy)
        if loss not in LOSSES:
            raise ValueError(f"{name} loss must be one of {LOSSES}, got {loss!r}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"{name} chunk_size must be a positive number of tasks or None, got {chunk_size}")
        self.net = backbone(out_features=ways)
        self.ways = ways
        self.fixed_ways = ways  # the classifier head has exactly `ways` outputs
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.eval_inner_steps = int(eval_inner_steps)
        self.first_order = bool(first_order)
        self.strategy = strategy
        self.chunk_size = chunk_size
        self.loss = loss
        self.forms = VmapForms()  # how the vmap step runs its passes (fewshot.algorithms.vmap_forms)

    def graph_bytes(
        self, image_shape: Sequence[int], support: int, query: int, tasks: int, device: torch.device
    ) -> int:
        """A rough upper estimate of one meta-training step's autograd graph, in bytes (inner_loop_graph_bytes).
        Tasks in flight: one per worker thread in the CPU loop, else chunk_size (or the whole meta-batch)."""
        strategy = resolve_strategy(self.strategy, device)
        workers = loop_workers(strategy, torch.device(device), tasks)
        in_flight = workers if workers > 1 else min(tasks, self.chunk_size or tasks)
        second_order = not self.first_order
        return inner_loop_graph_bytes(
            self.net, image_shape, support, query, self.inner_steps, second_order, 1, in_flight
        )

    def _regression(self, y: torch.Tensor) -> bool:
        return self.loss == "mse" or (self.loss == "auto" and y.is_floating_point())

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(out, y) if self._regression(y) else F.cross_entropy(out, y)

    def _score(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-task metric: query accuracy, or query MSE for regression."""
        return F.mse_loss(out, y) if self._regression(y) else accuracy(out, y)

    def _output(
        self, y: torch.Tensor, loss: torch.Tensor, score: torch.Tensor, steps: Optional[torch.Tensor] = None
    ) -> AlgoOutput:
        return AlgoOutput(loss=loss, score=score, metric="mse" if self._regression(y) else "acc", step_score=steps)

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"eval_inner_steps={self.eval_inner_steps}, first_order={self.first_order}, "
            f"strategy={self.strategy!r}, chunk_size={self.chunk_size}, loss={self.loss!r}"
        )

    # ---- one task ------------------------------------------------------------------------------------

    def _inner_step(
        self,
        call: _StatelessCall,
        weights: Weights,
        x: torch.Tensor,
        y: torch.Tensor,
        second_order: bool,
        functorch: bool,
        lrs: Optional[Weights] = None,
    ) -> Weights:
        """One SGD step on the support loss. functorch: gradients by torch.func.grad (needed under vmap;
        the result stays differentiable for the outer graph, so first order detaches it) instead of
        torch.autograd.grad (create_graph only for second order). lrs: a step size per weight, by name
        (Meta-SGD's learned ones); None: the scalar inner_lr."""

        def support_loss(w: Weights) -> torch.Tensor:
            return self._loss(call(w, x), y)

        if functorch:
            grads = torch.func.grad(support_loss)(weights)
            if not second_order:
                grads = {k: g.detach() for k, g in grads.items()}
        else:
            grads = dict(
                zip(
                    weights,
                    torch.autograd.grad(support_loss(weights), tuple(weights.values()), create_graph=second_order),
                )
            )
        if lrs is None:
            return {k: torch.add(w, grads[k], alpha=-self.inner_lr) for k, w in weights.items()}
        return {k: w - lrs[k] * grads[k] for k, w in weights.items()}

    def inner_lrs(self) -> tuple[torch.Tensor, ...]:
        """Meta-learned step sizes, one tensor per parameter of self.net in named_parameters() order; MAML has
        none (its inner_lr is a constant). They are meta-parameters beside the net's: forward hands them to
        the inner loop, and the meta-gradient reaches them."""
        return ()

    def _lr_dict(self, names: Sequence[str], lrs: Sequence[torch.Tensor]) -> Optional[Weights]:
        return dict(zip(names, lrs)) if lrs else None

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, steps: Optional[int] = None) -> Weights:
        """The weights after `steps` (default eval_inner_steps) inner steps on one task's support set
        (ways*shots, C, H, W), (ways*shots,), detached; self.net is left as it is. For inspection and tests:
        use them with torch.func.functional_call(algo.net, weights, (x,))."""
        weights = {k: p.detach().requires_grad_() for k, p in self.net.named_parameters()}
        lrs = self._lr_dict(list(weights), [lr.detach() for lr in self.inner_lrs()])
        call = _StatelessCall(self.net)
        steps = self.eval_inner_steps if steps is None else steps
        with torch.enable_grad():
            weights = self._adapt(call, call, weights, support_x, support_y, steps, False, functorch=False, lrs=lrs)
        return {k: w.detach() for k, w in weights.items()}

    def _adapt(
        self,
        call: _StatelessCall,
        later_call: _StatelessCall,
        weights: Weights,
        x: torch.Tensor,
        y: torch.Tensor,
        steps: int,
        second_order: bool,
        functorch: bool,
        lrs: Optional[Weights] = None,
    ) -> Weights:
        """`steps` inner steps on one task's support set: the first through call, the later ones through later_call."""
        for step in range(steps):
            call_now = call if step == 0 else later_call
            weights = self._inner_step(call_now, weights, x, y, second_order, functorch, lrs)
        return weights

    def _task(
        self,
        call: _StatelessCall,
        weights: Weights,
        support_x: torch.Tensor,  # (ways*shots, C, H, W)
        support_y: torch.Tensor,  # (ways*shots,)
        query_x: torch.Tensor,  # (ways*queries, C, H, W)
        query_y: torch.Tensor,  # (ways*queries,)
        steps: int,
        meta: bool,
        functorch: bool,
        query_call: Optional[_StatelessCall] = None,
        later_call: Optional[_StatelessCall] = None,
        lrs: Optional[Weights] = None,
    ) -> tuple[torch.Tensor, ...]:
        """Adapt to one task and score its query set. The first inner step's support pass runs through call, the
        later ones through later_call, the query passes through query_call (both default: call).

        meta=True (meta-training): returns (loss, acc); the loss keeps the graph to `weights`.
        meta=False (test): `weights` come in detached, query passes run without a graph, and the result
        is (loss, acc, step_acc) with the query accuracy before adaptation and after every inner step."""
        query_call = query_call or call
        if meta:
            later_call, second_order = later_call or call, not self.first_order
            weights = self._adapt(call, later_call, weights, support_x, support_y, steps, second_order, functorch, lrs)
            with torch.enable_grad():
                logits = query_call(weights, query_x)
                loss = self._loss(logits, query_y)
            return loss, self._score(logits.detach(), query_y)
        step_acc = []
        for _ in range(steps):
            with torch.no_grad():
                step_acc.append(self._score(query_call(weights, query_x), query_y))
            weights = self._inner_step(call, weights, support_x, support_y, False, functorch, lrs)
        with torch.no_grad():
            logits = query_call(weights, query_x)
            loss = self._loss(logits, query_y)
        acc = self._score(logits, query_y)
        step_acc.append(acc)
        return loss, acc, torch.stack(step_acc)

    def _grouped_query(
        self, weights: Weights, xs: Sequence[torch.Tensor], steps: int, calls: tuple, lrs: Optional[Weights]
    ) -> tuple:
        """Meta-training's (losses (T,), accs (T,)) with the inner loop under vmap and the query pass outside it,
        as one grouped network over the tasks (VmapForms.grouped_query)."""
        adapted = torch.func.vmap(
            lambda w, x, y: self._adapt(*calls, w, x, y, steps, not self.first_order, functorch=True, lrs=lrs),
            in_dims=(None, 0, 0),
            randomness="error",
        )(weights, xs[0], xs[1])
        conv = "fprop" if self.forms.fprop(not self.first_order) else "cudnn"
        logits = grouped.GroupedCall(self.net, conv)(adapted, xs[2])  # (T, ways*queries, out)
        return torch.func.vmap(self._loss)(logits, xs[3]), torch.func.vmap(self._score)(logits.detach(), xs[3])

    # ---- many tasks ----------------------------------------------------------------------------------

    def _tasks(
        self,
        weights: Weights,
        xs: Sequence[torch.Tensor],
        steps: int,
        meta: bool,
        strategy: str,
        workers: int = 1,
        lrs: Optional[Weights] = None,
    ):
        """_task over the leading task dim of xs = (support_x, support_y, query_x, query_y), stacked:
        (losses (T,), accs (T,)) when meta, else (losses, accs, step_acc (T, steps+1))."""
        if strategy == "vmap":
            second_order = meta and not self.first_order
            call, later, query = self.forms.calls(self.net, second_order)
            if meta and self.forms.grouped_query and grouped.supports(self.net):
                return self._grouped_query(weights, xs, steps, (call, later), lrs)
            return torch.func.vmap(
                lambda w, *task: self._task(
                    call, w, *task, steps=steps, meta=meta, functorch=True, query_call=query, later_call=later, lrs=lrs
                ),
                in_dims=(None, 0, 0, 0, 0),
                chunk_size=None if meta else self.chunk_size,  # meta-training chunks are taken in forward()
                randomness="error",
            )(weights, *xs)
        results = parallel_tasks(
            self.net,
            lambda call, t: self._task(
                call, weights, *(x[t] for x in xs), steps=steps, meta=meta, functorch=False, lrs=lrs
            ),
            xs[0].shape[0],
            workers,
        )
        return tuple(torch.stack(column) for column in zip(*results))

    def _meta_gradient(
        self,
        names: Sequence[str],
        leaves: Sequence[torch.Tensor],
        xs: Sequence[torch.Tensor],
        strategy: str,
        workers: int,
    ):
        """Mean meta-loss, per-task accuracy and the mean meta-gradient w.r.t. `leaves` (the net's weights, then
        inner_lrs()), never holding more than one chunk's (or, threaded, one task per worker's) graph."""
        tasks = xs[0].shape[0]
        weights = dict(zip(names, leaves))
        lrs = self._lr_dict(names, leaves[len(names) :])
        if workers > 1:

            def one(call: _StatelessCall, t: int) -> tuple:
                loss, acc = self._task(
                    call, weights, *(x[t] for x in xs), steps=self.inner_steps, meta=True, functorch=False, lrs=lrs
                )
                return loss.detach(), acc, torch.autograd.grad(loss, leaves, allow_unused=True)

            parts = parallel_tasks(self.net, one, tasks, workers)
        else:
            chunk = self.chunk_size or tasks
            parts = []
            for lo in range(0, tasks, chunk):
                chunk_xs = [x[lo : lo + chunk] for x in xs]
                losses, accs = self._tasks(weights, chunk_xs, self.inner_steps, True, strategy, lrs=lrs)
                total = losses.sum()
                parts.append((total.detach(), accs, torch.autograd.grad(total, leaves, allow_unused=True)))
        grads = [torch.zeros_like(p) for p in leaves]
        for _, _, part_grads in parts:  # in task order, so the sum is deterministic
            for g, pg in zip(grads, part_grads):
                if pg is not None:
                    g.add_(pg)
        loss = torch.stack([p[0] for p in parts]).sum() / tasks
        acc = torch.cat([p[1].reshape(-1) for p in parts])
        return loss, acc, [g / tasks for g in grads]

    # ---- the meta-batch ------------------------------------------------------------------------------

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        device = episode.support_x.device
        strategy = resolve_strategy(self.strategy, device)
        xs = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        tasks = episode.tasks
        workers = loop_workers(strategy, device, tasks)
        with torch.enable_grad():  # the inner loop differentiates, also when a caller evaluates under no_grad
            names, params = zip(*self.net.named_parameters())
            lrs = self.inner_lrs()
            if not train:
                weights = {k: p.detach().requires_grad_() for k, p in zip(names, params)}
                fixed = self._lr_dict(names, [lr.detach() for lr in lrs])
                losses, accs, step_acc = self._tasks(
                    weights, xs, self.eval_inner_steps, False, strategy, workers, lrs=fixed
                )
                return self._output(episode.query_y, losses.mean(), accs, step_acc)
            if workers > 1 or (self.chunk_size is not None and self.chunk_size < tasks):
                loss, acc = _MetaGradient.apply(
                    lambda leaves: self._meta_gradient(names, leaves, xs, strategy, workers), *params, *lrs
                )
            else:  # the whole meta-batch's graph; loss.backward() differentiates through it
                weights = dict(zip(names, params))
                losses, acc = self._tasks(weights, xs, self.inner_steps, True, strategy, lrs=self._lr_dict(names, lrs))
                loss = losses.mean()
        return self._output(episode.query_y, loss, acc.detach())
