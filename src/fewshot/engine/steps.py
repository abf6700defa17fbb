"""One meta-iteration: draw a meta-batch, forward, backward, clip, optimizer and schedule step.

Two ways to run the same iteration:
- EagerStep: PyTorch as written. It reads the loss on the host every iteration (a device synchronisation) and
  stops a diverged run before its optimizer step, so the weights stay the last good ones.
- GraphStep (trainer.cuda_graph): the meta-batch is drawn into preallocated ("static") tensors and the forward,
  backward, clipping and optimizer step are captured once as a CUDA graph and replayed every iteration: one
  launch instead of thousands of small kernels, which is what a second-order MAML step is bound by on a GPU. Nothing
  in the loop synchronises with the host: loss and score stay on the device until the loop reads them at logging,
  validation and checkpoint points, and divergence is recorded on the device (first bad iteration and its loss)
  and raised at the next such point, before anything is saved. With capture=False (and on a CPU) it runs the same
  static-buffer code eagerly: tests/test_steps.py checks that it computes exactly EagerStep's update. Where an
  algorithm's step changes its host-side flow during a run (Algorithm.graph_phase: MAML++ when its multi-step loss
  ends), the graph is dropped at that iteration, warmed up again and captured afresh.

Adam and AdamW are captured with capturable=True (their step counters on the device) and the learning rate read
from a device tensor that the schedule refills each iteration; checkpoints hold the plain (portable) form of the
optimizer state, so a run may resume with or without graphs (fewshot.engine.checkpoints.optimizer_state).
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch

from fewshot.algorithms.base import Algorithm
from fewshot.data.base import Episode
from fewshot.engine.graphs import on_side_stream, static_shapes, try_capture
from fewshot.errors import FewshotError

# A training loss this many times its first value (or more than this, for a first loss below 1) means the run
# has diverged: it will not come back, and an infinite loss may take long to appear (meta_lr=1e9 reached 1.7e19).
DIVERGED = 100.0
# Eager iterations on the static tensors before capture: cuDNN/cuBLAS pick their kernels and workspaces, and the
# optimizer creates its state, outside the graph (as torch.cuda.graphs' documentation asks).
WARMUP = 3


def divergence_limit(first: float) -> float:
    return DIVERGED * max(abs(first), 1.0)


def step_sizes(algo: Algorithm) -> str:
    """The settings to lower when a run diverges: the meta step size, and the inner one where the algorithm has one."""
    return " or ".join(filter(None, ("trainer.meta_lr", algo.step_size_setting)))


def divergence_error(loss: float, first: float, it: int, ckpt_dir, algo: Algorithm) -> FewshotError:
    what = f"became {loss}" if not math.isfinite(loss) else f"reached {loss:.3g} (it started at {first:.3g})"
    return FewshotError(
        f"training loss {what} at iteration {it}: the run diverged and stopped; the last good "
        f"checkpoint is in {ckpt_dir}. Lower {step_sizes(algo)}"
    )


class EagerStep:
    """One meta-iteration as PyTorch runs it. __call__(it) -> (loss, mean score) as 0-dim device tensors."""

    graphed = False

    def __init__(
        self,
        algo: Algorithm,
        sampler,
        optimizer: torch.optim.Optimizer,
        scheduler,
        tasks: int,
        grad_clip: Optional[float],
        progress,
        ckpt_dir,
    ) -> None:
        self.algo, self.sampler, self.optimizer, self.scheduler = algo, sampler, optimizer, scheduler
        self.tasks, self.grad_clip, self.progress, self.ckpt_dir = tasks, grad_clip, progress, ckpt_dir
        self.metric = progress.metric

    def _clip(self) -> None:
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.algo.parameters(), self.grad_clip)

    def _first_loss(self, loss: float) -> float:
        if self.progress.first_loss is None:
            self.progress.first_loss = loss
        return self.progress.first_loss

    def __call__(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        episode = self.sampler.sample(self.tasks)  # support_x (T, ways*shots, C, H, W)
        out = self.algo(episode, train=True)
        self.metric = out.metric
        loss = out.loss.item()
        first = self._first_loss(loss)
        # Checked before the step, so the weights stay the last good ones.
        if not math.isfinite(loss) or abs(loss) > divergence_limit(first):
            raise divergence_error(loss, first, it, self.ckpt_dir, self.algo)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self._clip()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return out.loss.detach(), out.per_task().mean()

    def check(self) -> None:
        """Raise what the device recorded since the last check (nothing to do here: checked every iteration)."""


class GraphStep(EagerStep):
    """The iteration on static tensors, replayed as one CUDA graph after WARMUP eager iterations (see the module
    docstring). capture=False, or a device other than CUDA: the same code, eagerly."""

    def __init__(self, *args, capture: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.device = next(self.algo.parameters()).device
        self.capture = capture and self.device.type == "cuda"
        self.static: Optional[Episode] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.outputs: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.calls = 0
        self.warm = 0  # eager iterations since the start or the last drop: the warm-up before a capture
        self.phase = None  # the algorithm's graph_phase that the graph froze
        self.captures = 0
        self.pool_bytes = self.peak_bytes = 0  # the graph's memory pool, and its tensors' peak (engine.graphs.capture)
        # Divergence, recorded on the device: the iteration counter, the limit, the first bad iteration and loss.
        zeros = dict(device=self.device)
        self._it = torch.zeros((), dtype=torch.int64, **zeros)
        self._limit = torch.full((), math.inf, **zeros)
        self._bad_it = torch.zeros((), dtype=torch.int64, **zeros)
        self._bad_loss = torch.zeros((), **zeros)
        self._lr: list[torch.Tensor] = []
        if self.capture:
            self._make_capturable()
            static_shapes()

    def _make_capturable(self) -> None:
        check_capturable(self.optimizer)
        groups = self.optimizer.param_groups
        for group in groups:
            group["capturable"] = True
            for p in group["params"]:  # a resumed state holds its step counters on the CPU
                state = self.optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(p.device, torch.float32)
        self._lr = [torch.tensor(float(g["lr"]), device=self.device) for g in groups]

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.algo(self.static, train=True)
        self.metric = out.metric
        self.optimizer.zero_grad(set_to_none=False)  # in place: the graph's gradient tensors stay where they are
        out.loss.backward()
        self._clip()
        self.optimizer.step()
        loss = out.loss.detach()
        self._it += 1
        newly = (~torch.isfinite(loss) | (loss.abs() > self._limit)) & (self._bad_it == 0)
        self._bad_it.copy_(torch.where(newly, self._it, self._bad_it))
        self._bad_loss.copy_(torch.where(newly, loss, self._bad_loss))
        return loss, out.per_task().mean()

    def _draw(self) -> None:
        if self.static is None:
            self.static = self.sampler.sample(self.tasks)
        else:
            self.sampler.sample(self.tasks, out=self.static)

    def _eager(self) -> tuple[torch.Tensor, torch.Tensor]:
        return on_side_stream(self._body, self.device) if self.capture else self._body()

    def _capture(self) -> None:
        """Capture the step, or (when it cannot be) go on eagerly for the rest of the run."""
        # The graph reads the learning rate from device tensors; the schedule keeps working on plain floats.
        floats = [g["lr"] for g in self.optimizer.param_groups]
        try:
            for group, lr in zip(self.optimizer.param_groups, self._lr):
                group["lr"] = lr
            captured = try_capture(self._body, self.device, "trainer.cuda_graph")
        finally:
            for group, lr in zip(self.optimizer.param_groups, floats):
                group["lr"] = lr
        if captured is None:
            self.capture = False
        else:
            self.graph, self.outputs, self.pool_bytes, self.peak_bytes = captured
            self.captures += 1

    def _drop(self) -> None:
        """Let the graph go, its memory pool with it: the next WARMUP iterations run eagerly in the new phase (new
        kernels pick their algorithms outside a capture), then it is captured again."""
        self.outputs = None
        self.graph.reset()
        self.graph, self.warm = None, 0

    def __call__(self, it: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and mean score of iteration `it`, on the device; valid until the next call (a replay overwrites
        them), which is why the loop adds them to its running sums at once."""
        if self.calls == 0:
            self._it.fill_(it - 1)
            if self.progress.first_loss is not None:  # a resumed run knows its first loss
                self._limit.fill_(divergence_limit(self.progress.first_loss))
        self.calls += 1
        phase = self.algo.graph_phase(it)
        if self.graph is not None and phase != self.phase:
            self._drop()  # the step's host-side flow changes here (MAML++ ending its multi-step loss)
        self._draw()
        if self.graph is None and self.capture and self.warm >= WARMUP:
            self.phase, self.algo.graph_iteration = phase, it
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            loss, score = self.outputs
        else:
            loss, score = self._eager()
            self.warm += 1
        if self.progress.first_loss is None:  # the run's first iteration: its one host read of the loss
            self._limit.fill_(divergence_limit(self._first_loss(loss.item())))
            self.check()
        if self.scheduler is not None:
            self.scheduler.step()
            for group, lr in zip(self.optimizer.param_groups, self._lr):
                lr.fill_(group["lr"])
        return loss, score

    def check(self) -> None:
        bad_it = int(self._bad_it.item())
        if bad_it:
            raise divergence_error(self._bad_loss.item(), self.progress.first_loss, bad_it, self.ckpt_dir, self.algo)


class CaptureUnsupported(FewshotError):
    """This run's step cannot be captured as a CUDA graph; the message says why."""


def check_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Raise CaptureUnsupported unless GraphStep captures this optimizer: Adam and AdamW, whose capturable mode
    with a learning rate read from a device tensor was measured on a GPU. RMSprop has a capturable mode too, but
    fewshot has not run it under a graph, so it runs eagerly (auto) or is refused (on)."""
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        name = type(optimizer).__name__
        # No advice to switch optimizers: Reptile's protocol is its SGD meta step.
        raise CaptureUnsupported(f"torch.optim.{name} is not captured (fewshot captures Adam and AdamW)")


def make_step(mode: str, device: torch.device, *args, **kwargs) -> EagerStep:
    """The step trainer.cuda_graph asks for: off (eager), on (graphs; CUDA only), auto (graphs on CUDA when the
    optimizer can be captured, else eager)."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return EagerStep(*args, **kwargs)
    if device.type != "cuda":
        raise FewshotError(f"trainer.cuda_graph=on needs device=cuda (this run is on {device}); use off or auto")
    try:
        return GraphStep(*args, **kwargs)
    except CaptureUnsupported as e:
        if mode == "on":
            raise FewshotError(f"trainer.cuda_graph=on: {e}") from e
        print(f"fewshot: trainer.cuda_graph=auto: {e}; running eagerly", file=sys.stderr)
        return EagerStep(*args, **kwargs)
