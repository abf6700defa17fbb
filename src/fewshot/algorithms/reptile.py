"""Reptile (Nichol, Achiam, Schulman 2018, arXiv 1803.02999), as openai/supervised-reptile trains and tests it.

Training, for each task of the meta-batch in turn: a copy of the weights takes `inner_steps` steps of the inner
optimizer on mini-batches of `inner_batch` images drawn without replacement from all the task's images (support and
query alike: the presets draw 10 per class, the reference's --train-shots 10), reshuffled when used up, a batch
running on across the reshuffle as the reference's _mini_batches does. The meta-update moves the weights toward
the mean of the adapted copies, theta <- theta + eps (mean phi - theta). The loss handed to the engine has that
update as its gradient (theta - mean phi, from 1/2 |theta - mean phi|^2), so the engine's SGD without momentum at
trainer.meta_lr = eps, with schedule=linear from 1 to 0 (the reference's --meta-step 1 --meta-step-final 0),
makes exactly the reference's step; its value is the mean inner cross-entropy, what the progress bar shows.

The inner optimizer is Adam with beta1 = 0 (the reference's tf.train.AdamOptimizer(beta1=0)). As in the reference,
its moment estimates and step count carry over from task to task through the whole of training (the reference
restores only the trainable weights between tasks, not the optimizer's slots): they are buffers here, so
checkpoints keep them and a resumed run goes on exactly. A test task starts from that state and its changes are
dropped, as the reference restores every variable after each. Adam is torch's (eps added to the bias-corrected
root), where TensorFlow's adds eps before the correction: a difference of eps * (1 - sqrt(1 - beta2^t)).

Test: `eval_inner_steps` steps on mini-batches of `eval_inner_batch` support images, then the queries are
classified all at once (transductive=True: BatchNorm's statistics over the query batch, the reference's
--transductive, behind its published numbers) or each beside the whole support set (transductive=False: the
reference's default; BatchNorm's statistics over the support images and that one query). BatchNorm always uses
the batch's statistics (the backbones keep no running statistics), as the reference's training=True does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call

from fewshot.algorithms.base import AlgoOutput, Algorithm, BackboneFactory, accuracy
from fewshot.data.base import Episode


def mini_batches(tasks: int, n: int, steps: int, batch: int, device: torch.device) -> torch.Tensor:
    """(tasks, steps, batch) indices into each task's n images: successive random permutations of range(n),
    concatenated and cut into batches, so a batch may run on across a reshuffle (the reference's _mini_batches
    without replacement). Drawn from the device's default generator, which checkpoints keep."""
    reps = -(-steps * batch // n)  # permutations needed to cover steps * batch draws
    perms = torch.rand(tasks, reps, n, device=device).argsort(-1)
    return perms.flatten(1)[:, : steps * batch].reshape(tasks, steps, batch)


class Reptile(Algorithm):
    """backbone(out_features=ways) meta-trained by Reptile (see the module docstring).

    inner_lr, inner_steps, inner_batch: the inner Adam's learning rate, steps and mini-batch size in training.
    eval_inner_steps, eval_inner_batch: the same at validation and test (the learning rate is inner_lr).
    beta1, beta2, eps: the inner Adam's (the reference: beta1 = 0, TensorFlow's beta2 and eps).
    transductive: classify a test task's queries in one batch (True) or each beside the support set (False).
    """

    step_size_setting = "algo.inner_lr"
    cpu_channels_last = True  # its training and test steps 1.10x faster on a 2-core CPU (bench_channels_last.py)

    def __init__(
        self,
        backbone: BackboneFactory,
        ways: int,
        inner_lr: float = 0.001,
        inner_steps: int = 5,
        inner_batch: int = 10,
        eval_inner_steps: int = 50,
        eval_inner_batch: int = 5,
        beta1: float = 0.0,
        beta2: float = 0.999,
        eps: float = 1e-8,
        transductive: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("inner_steps", inner_steps),
            ("inner_batch", inner_batch),
            ("eval_inner_steps", eval_inner_steps),
            ("eval_inner_batch", eval_inner_batch),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be > 0, got {inner_lr}")
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in [0, 1), got {beta1} and {beta2}")
        self.net = backbone(out_features=ways)
        self.ways = self.fixed_ways = ways
        self.inner_lr, self.inner_steps, self.inner_batch = inner_lr, inner_steps, inner_batch
        self.eval_inner_steps, self.eval_inner_batch = eval_inner_steps, eval_inner_batch
        self.beta1, self.beta2, self.eps, self.transductive = beta1, beta2, eps, transductive
        self._names = [n for n, _ in self.net.named_parameters()]
        # The inner Adam's state, shared by every training task (module docstring): first and second moments per
        # parameter, and the step count (float64: exact for any run's count, and beta ** step in double).
        for i, (_, p) in enumerate(self.net.named_parameters()):
            self.register_buffer(f"adam_m{i}", torch.zeros_like(p))
            self.register_buffer(f"adam_v{i}", torch.zeros_like(p))
        self.register_buffer("adam_step", torch.zeros((), dtype=torch.float64))

    def extra_repr(self) -> str:
        return (
            f"ways={self.ways}, inner_lr={self.inner_lr}, inner_steps={self.inner_steps}, "
            f"inner_batch={self.inner_batch}, eval_inner_steps={self.eval_inner_steps}, "
            f"eval_inner_batch={self.eval_inner_batch}, beta1={self.beta1}, transductive={self.transductive}"
        )

    def adam_state(self) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        n = len(self._names)
        return (
            [getattr(self, f"adam_m{i}") for i in range(n)],
            [getattr(self, f"adam_v{i}") for i in range(n)],
            self.adam_step,
        )

    def adapt(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batches: torch.Tensor,
        state: tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor],
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """One task: a copy of the weights after an Adam step on x[b], y[b] for each row b of `batches` (steps,
        batch), updating `state` (m, v, step) in place. Returns the adapted weights (detached), and the mean loss
        and accuracy of the mini-batches, each before its step."""
        m, v, step = state
        weights = {n: p.detach().clone().requires_grad_() for n, p in self.net.named_parameters()}
        losses, accs = [], []
        for b in batches:
            logits = functional_call(self.net, weights, (x[b],))
            loss = F.cross_entropy(logits, y[b])
            grads = torch.autograd.grad(loss, list(weights.values()))
            losses.append(loss.detach())
            accs.append(accuracy(logits.detach(), y[b]))
            with torch.no_grad():
                step += 1
                corrections = self._corrections(step)
                for w, g, m_i, v_i in zip(weights.values(), grads, m, v):
                    new_w, new_m, new_v = self._adam(w, g, m_i, v_i, corrections)
                    w.copy_(new_w), m_i.copy_(new_m), v_i.copy_(new_v)
        return {n: w.detach() for n, w in weights.items()}, torch.stack(losses).mean(), torch.stack(accs).mean()

    def _corrections(self, step: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Adam's bias corrections at step number `step` (float64): 1 - beta1^step and sqrt(1 - beta2^step)."""
        return 1 - self.beta1**step, (1 - self.beta2**step).sqrt()

    def _adam(self, w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, corrections: tuple):
        """The inner Adam's step on weight w with gradient g and moments m, v (`corrections`: _corrections of its
        step number): (w, m, v) after it, as new tensors (training writes them back in place, the vmapped test
        carries them on)."""
        correction1, root_correction2 = corrections
        m = (m * self.beta1).add(g, alpha=1 - self.beta1)
        v = (v * self.beta2).addcmul(g, g, value=1 - self.beta2)
        denom = (v.sqrt() / root_correction2.to(v.dtype)).add(self.eps)
        return w - self.inner_lr * m / (correction1.to(m.dtype) * denom), m, v

    def _adapted_logits(
        self, x: torch.Tensor, y: torch.Tensor, batches: torch.Tensor, query_x: torch.Tensor
    ) -> torch.Tensor:
        """One test task, written for vmap over tasks: the weights after an Adam step on x[b], y[b] for each row b
        of `batches`, from the training's Adam state (read, never written), and the queries' logits with them."""
        m0, v0, step0 = self.adam_state()
        weights = {n: p.detach() for n, p in self.net.named_parameters()}
        m, v = dict(zip(self._names, m0)), dict(zip(self._names, v0))

        def loss(w: dict[str, torch.Tensor], b: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.net, w, (x[b],)), y[b])

        for k, b in enumerate(batches):
            grads = torch.func.grad(loss)(weights, b)
            corrections = self._corrections(step0 + (k + 1))
            for n in self._names:
                weights[n], m[n], v[n] = self._adam(weights[n], grads[n], m[n], v[n], corrections)
        return self._predict(weights, x, query_x)

    def forward(self, episode: Episode, train: bool = True) -> AlgoOutput:
        return self._meta_train(episode) if train else self._test(episode)

    def _meta_train(self, episode: Episode) -> AlgoOutput:
        x = torch.cat([episode.support_x, episode.query_x], dim=1)  # (T, n, ...): all of a task's images
        y = torch.cat([episode.support_y, episode.query_y], dim=1)
        tasks, n = y.shape
        batches = mini_batches(tasks, n, self.inner_steps, self.inner_batch, y.device)
        state = self.adam_state()
        adapted, losses, accs = [], [], []
        for t in range(tasks):  # in turn: each task's Adam steps start from the state the previous one left
            weights, loss, acc = self.adapt(x[t], y[t], batches[t], state)
            adapted.append(weights)
            losses.append(loss)
            accs.append(acc)
        target = {n: torch.stack([w[n] for w in adapted]).mean(0) for n in self._names}
        params = dict(self.net.named_parameters())
        # 1/2 |theta - mean phi|^2 has the Reptile update's direction as its gradient; the value shown is the
        # mean inner loss (the pull term adds zero to it).
        pull = sum(0.5 * (params[n] - target[n]).pow(2).sum() for n in self._names)
        inner_loss = torch.stack(losses).mean()
        return AlgoOutput(loss=inner_loss + (pull - pull.detach()), score=torch.stack(accs))

    def _test(self, episode: Episode) -> AlgoOutput:
        tasks, n = episode.support_y.shape
        batches = mini_batches(tasks, n, self.eval_inner_steps, self.eval_inner_batch, episode.support_y.device)
        # The tasks side by side, each from the training's Adam state: the same predictions as adapting them in
        # turn (logits to float rounding), faster on a batch of 25 5-way 1-shot test tasks on the 2-core CPU:
        # 1.88x alone (2 threads), 1.27x on one thread beside a training run (scripts/bench_reptile.py --test).
        logits = torch.func.vmap(self._adapted_logits)(episode.support_x, episode.support_y, batches, episode.query_x)
        logits = logits.detach()
        loss = F.cross_entropy(logits.flatten(0, 1), episode.query_y.flatten())  # every task has as many queries
        return AlgoOutput(loss=loss, score=accuracy(logits, episode.query_y))

    def _predict(self, weights: dict[str, torch.Tensor], support_x: torch.Tensor, query_x: torch.Tensor):
        if self.transductive:
            return functional_call(self.net, weights, (query_x,))

        def beside_support(q: torch.Tensor) -> torch.Tensor:  # the support images and one query, its logits
            return functional_call(self.net, weights, (torch.cat([support_x, q.unsqueeze(0)]),))[-1]

        return torch.func.vmap(beside_support)(query_x)
