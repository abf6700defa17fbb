"""MAML++ (Antoniou, Edwards, Storkey, "How to train your MAML", ICLR 2019), as AntreasAntoniou/
HowToTrainYourMAMLPytorch trains and tests it on Omniglot (few_shot_learning_system.py, inner_loop_optimizers.py,
meta_neural_network_architectures.py; its shipped omniglot_maml++ configs).

What MAML++ adds to MAML, each a setting here:
- LSLR (learn_inner_lrs): a learned step size per inner-loop tensor and per step, all starting at inner_lr; the
  update is w - lr[w][step] * grad (the reference keeps inner_steps + 1 per tensor and never reads the last).
- Per-step BatchNorm weights and biases (per_step_bn): each BatchNorm's gamma and beta are (inner_steps, C)
  meta-parameters, row i used by the support pass of step i and by the query pass after it (the query pass
  before any step, at test, uses row 0). BatchNorm parameters are never adapted in the inner loop, per step or
  not. The reference also keeps per-step running statistics, but normalises with the batch's statistics always
  (F.batch_norm(training=True), also at evaluation), so they never reach an output: fewshot's backbones keep none.
- MSL (msl_epochs): for the first msl_epochs epochs the task loss is the query loss after every step, weighted
  by the reference's get_per_step_loss_importance_vector (1/S each at epoch 0, the non-final weights falling by
  1/(S * msl_epochs) per epoch to a floor of 0.03/S, the final one rising to match); afterwards the final step's
  query loss alone. The weights are computed on the device from the meta-iteration counter (a buffer, so
  resumed runs go on exactly), which a CUDA graph replays correctly.
- Derivative-order annealing (first_order_epochs): first order for the first first_order_epochs epochs, second
  order after. The shipped Omniglot configs set it off (first_order_to_second_order_epoch -1): 0 here.
- Whether MSL's intermediate query passes run, and the derivative order, are host-side control flow: a captured
  step (trainer.cuda_graph) is captured afresh when either changes (graph_phase), so after MSL's epochs the graph
  computes the final step's query pass alone.
- Cosine annealing of the meta learning rate is the engine's schedule=cosine (the presets' choice).
An epoch is epoch_iterations meta-iterations (the reference's 500).

Inner-loop parameters are every weight of the net but BatchNorm's. Validation and test adapt with the same
inner_steps (per-step parameters exist for those steps only) and report the query accuracy before adapting and
after each step; first order there, as in the reference's evaluation.

The reference tests an ensemble of the 5 best validation checkpoints, their final-step logits averaged: the
engine's eval.ensemble (fewshot.engine.ensemble), which the presets set; forward(train=False) reports the logits.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.algorithms.functional import check_inner_loop, inner_loop_graph_bytes, resolve_strategy
from fewshot.data.base import Episode

Weights = dict[str, torch.Tensor]


def loss_weights(epoch: torch.Tensor, steps: int, msl_epochs: int) -> torch.Tensor:
    """(steps,) MSL importance of each step's query loss at `epoch` (a 0-dim tensor), as the reference's
    get_per_step_loss_importance_vector; from epoch msl_epochs on (or with msl_epochs 0) the final step's alone."""
    final = torch.zeros(steps, device=epoch.device)
    final[-1] = 1.0
    if msl_epochs == 0 or steps == 1:
        return final
    e = epoch.to(torch.float64)
    decay, floor = 1.0 / steps / msl_epochs, 0.03 / steps
    early = torch.clamp(1.0 / steps - e * decay, min=floor).expand(steps - 1)
    last = torch.clamp(1.0 / steps + e * (steps - 1) * decay, max=1.0 - (steps - 1) * floor)
    weights = torch.cat([early, last.reshape(1)]).to(torch.float32)
    return torch.where(e < msl_epochs, weights, final)


def _capturing(t: torch.Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


class MAMLPlusPlus(Algorithm):
    """MAML++ over a meta-batch of tasks (see the module docstring).

    inner_lr: the inner step size (with learn_inner_lrs, every per-layer, per-step step size's start).
    inner_steps: inner steps in training and at test.
    learn_inner_lrs, per_step_bn: LSLR and per-step BatchNorm weights and biases.
    msl_epochs: epochs of the multi-step loss (0: the final step's query loss throughout).
    epoch_iterations: meta-iterations per epoch, for msl_epochs and first_order_epochs.
    first_order: first order throughout; first_order_epochs: first order for that many epochs, then second.
    strategy: "loop" (task by task, torch.autograd.grad), "vmap" (torch.func over the tasks) or "auto" (vmap on
        CUDA, loop elsewhere).
    """

    reports_logits = True  # its test may average the logits of the best checkpoints (eval.ensemble)
    step_size_setting = "algo.inner_lr"  # every learned step size's start

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        learn_inner_lrs: bool = True,
        per_step_bn: bool = True,
        msl_epochs: int = 10,
        epoch_iterations: int = 500,
        first_order: bool = False,
        first_order_epochs: int = 0,
        strategy: str = "auto",
    ) -> None:
        super().__init__()
        check_inner_loop("MAML++", inner_steps, strategy=strategy)
        if epoch_iterations < 1 or msl_epochs < 0 or first_order_epochs < 0:
            raise ValueError(
                "MAML++ needs epoch_iterations >= 1, msl_epochs >= 0 and first_order_epochs >= 0, "
                f"got {epoch_iterations}, {msl_epochs}, {first_order_epochs}"
            )
        self.net = backbone(out_features=ways)
        self.ways = self.fixed_ways = ways
        self.inner_steps, self.msl_epochs, self.epoch_iterations = int(inner_steps), int(msl_epochs), epoch_iterations
        self.first_order, self.first_order_epochs = bool(first_order), int(first_order_epochs)
        self.per_step_bn, self.strategy = bool(per_step_bn), strategy
        norms = [(name, m) for name, m in self.net.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self.bn_names = [f"{name}.{p}" for name, m in norms if m.affine for p in ("weight", "bias")]
        rows = []
        if self.per_step_bn:  # the net's gamma and beta become (inner_steps, C) meta-parameters here
            for _, m in norms:
                if m.affine:
                    rows += [
                        m.weight.detach().expand(inner_steps, -1).clone(),
                        m.bias.detach().expand(inner_steps, -1).clone(),
                    ]
                    m.weight, m.bias = None, None
        self.bn_steps = nn.ParameterList(nn.Parameter(r) for r in rows)  # in bn_names order
        self.inner_names = [k for k, _ in self.net.named_parameters() if k not in self.bn_names]
        self.lrs = nn.ParameterList(
            nn.Parameter(torch.full((inner_steps,), float(inner_lr)), requires_grad=bool(learn_inner_lrs))
            for _ in self.inner_names
        )
        self.register_buffer("meta_iterations", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, inner_steps={self.inner_steps}, learn_inner_lrs={self.lrs[0].requires_grad}, "
            f"per_step_bn={self.per_step_bn}, msl_epochs={self.msl_epochs}, epoch_iterations={self.epoch_iterations}, "
            f"first_order={self.first_order}, first_order_epochs={self.first_order_epochs}, strategy={self.strategy!r}"
        )

    def graph_bytes(
        self, image_shape: Sequence[int], support: int, query: int, tasks: int, device: torch.device
    ) -> int:
        """A rough upper estimate of the largest training step's autograd graph, in bytes (inner_loop_graph_bytes):
        MSL's query pass after every step while it lasts, second order unless first_order, every task at once."""
        msl = self._flow(0)[0]
        passes = self.inner_steps if msl else 1
        return inner_loop_graph_bytes(
            self.net, image_shape, support, query, self.inner_steps, not self.first_order, passes, tasks
        )

    # ---- one task ------------------------------------------------------------------------------------------------

    def _call(self, weights: Weights, bn: Sequence[torch.Tensor], step: int, x: torch.Tensor) -> torch.Tensor:
        """The net on x with the inner-loop weights and BatchNorm row `step` (per-step BN; else the net's own)."""
        rows = {name: p[step] for name, p in zip(self.bn_names, bn)} if self.per_step_bn else {}
        return functional_call(self.net, {**weights, **rows}, (x,))

    def _task(
        self,
        weights: Weights,
        lrs: Weights,
        bn: Sequence[torch.Tensor],
        support_x: torch.Tensor,  # (ways*shots, C, H, W)
        support_y: torch.Tensor,
        query_x: torch.Tensor,  # (ways*queries, C, H, W)
        query_y: torch.Tensor,
        meta: bool,
        second_order: bool,
        step_weights: Optional[torch.Tensor],
        functorch: bool,
    ) -> tuple[torch.Tensor, ...]:
        """Adapt to one task. meta=True: (loss, acc), the loss the MSL-weighted query losses after each step
        (step_weights (S,)) or, step_weights None, the final step's. meta=False: (loss, acc, step_acc (S+1,),
        the final query logits)."""
        step_acc, losses = [], []
        if not meta:
            with torch.no_grad():
                step_acc.append(accuracy(self._call(weights, bn, 0, query_x), query_y))
        for step in range(self.inner_steps):

            def support_loss(w: Weights, step: int = step) -> torch.Tensor:
                return F.cross_entropy(self._call(w, bn, step, support_x), support_y)

            if functorch:
                grads = torch.func.grad(support_loss)(weights)
                if not second_order:
                    grads = {k: g.detach() for k, g in grads.items()}
            else:
                values = torch.autograd.grad(support_loss(weights), tuple(weights.values()), create_graph=second_order)
                grads = dict(zip(weights, values))
            weights = {k: w - lrs[k][step] * grads[k] for k, w in weights.items()}
            if not meta:
                with torch.no_grad():
                    logits = self._call(weights, bn, step, query_x)
                step_acc.append(accuracy(logits, query_y))
            elif step_weights is not None or step == self.inner_steps - 1:
                logits = self._call(weights, bn, step, query_x)
                losses.append(F.cross_entropy(logits, query_y))
        if not meta:
            return F.cross_entropy(logits, query_y), step_acc[-1], torch.stack(step_acc), logits
        loss = (torch.stack(losses) * step_weights).sum() if step_weights is not None else losses[-1]
        return loss, accuracy(logits.detach(), query_y)

    # ---- the meta-batch ------------------------------------------------------------------------------------------

    def _tasks(self, xs: Sequence[torch.Tensor], strategy: str, params: tuple, flags: dict) -> tuple[torch.Tensor, ...]:
        """_task(*params, <task>, **flags) over the leading task dim of xs = (support_x, support_y, query_x,
        query_y), stacked. params: (weights, step sizes, BatchNorm rows), shared by the tasks."""
        if strategy == "vmap":
            return torch.func.vmap(
                lambda *task: self._task(*params, *task, **flags, functorch=True), randomness="error"
            )(*xs)
        results = [self._task(*params, *(x[t] for x in xs), **flags, functorch=False) for t in range(len(xs[0]))]
        return tuple(torch.stack(column) for column in zip(*results))

    def _flow(self, epoch: int) -> tuple[bool, bool]:
        """(multi-step loss, second order) in `epoch`: the host-side control flow of a training step."""
        msl = self.msl_epochs > 0 and self.inner_steps > 1 and epoch < self.msl_epochs
        return msl, not self.first_order and epoch >= self.first_order_epochs

    def _flow_changes(self) -> bool:
        """Whether the flow differs anywhere from epoch 0's: by the later of the two switches, both have happened."""
        return self._flow(0) != self._flow(max(self.msl_epochs, self.first_order_epochs))

    def graph_phase(self, iteration: int) -> Optional[tuple[bool, bool]]:
        """The flow of training iteration `iteration` (meta-iterations done before it: iteration - 1): a captured
        step is captured again when MSL ends or the derivative order changes, so that it neither keeps computing
        query passes whose weight has become 0 nor freezes the first order."""
        return self._flow((iteration - 1) // self.epoch_iterations) if self._flow_changes() else None

    def _epoch(self) -> int:
        """The epoch of this training step, for its host-side flow: the device counter read on the host in an
        eager step (only where the flow changes, so other runs never wait on it); while GraphStep captures, the
        iteration it captures for."""
        if not self._flow_changes():
            return 0
        if not _capturing(self.meta_iterations):
            return int(self.meta_iterations) // self.epoch_iterations
        if self.graph_iteration is None:
            raise RuntimeError(
                "MAML++'s training step is captured by engine.steps.GraphStep, which sets graph_iteration"
            )
        return (self.graph_iteration - 1) // self.epoch_iterations

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        strategy = resolve_strategy(self.strategy, episode.support_x.device)
        xs = (episode.support_x, episode.support_y, episode.query_x, episode.query_y)
        named = dict(self.net.named_parameters())
        weights = {k: named[k] for k in self.inner_names}
        lrs = dict(zip(self.inner_names, self.lrs))
        bn = list(self.bn_steps)
        with torch.enable_grad():  # the inner loop differentiates, also when a caller evaluates under no_grad
            if not train:
                params = (
                    {k: w.detach().requires_grad_() for k, w in weights.items()},
                    {k: lr.detach() for k, lr in lrs.items()},
                    [p.detach() for p in bn],
                )
                flags = dict(meta=False, second_order=False, step_weights=None)
                losses, accs, step_acc, logits = self._tasks(xs, strategy, params, flags)
                return AlgoOutput(loss=losses.mean(), score=accs, step_score=step_acc, logits=logits)
            msl, second_order = self._flow(self._epoch())
            # MSL's weights within its epochs come from the device counter, which a replayed graph reads right.
            epoch = self.meta_iterations // self.epoch_iterations  # before this iteration's count
            step_weights = loss_weights(epoch, self.inner_steps, self.msl_epochs) if msl else None
            self.meta_iterations += 1
            flags = dict(meta=True, second_order=second_order, step_weights=step_weights)
            losses, accs = self._tasks(xs, strategy, (weights, lrs, bn), flags)
        return AlgoOutput(loss=losses.mean(), score=accs.detach())
