"""MAML's sinusoid regression tasks (Finn, Abbeel, Levine 2017, Section 5.1).

A task is y = amplitude * sin(x - phase), amplitude ~ U[0.1, 5.0], phase ~ U[0, pi], with x ~ U[-5, 5] for
its support and query points (the official code, cbfinn/maml data_generator.py, writes sin(x - phase)). There
is no fixed data: every task is drawn fresh, so the splits differ only by the seed of their generator (the
engine gives each split its own seed stream, and reseeds the validation and test generators for fixed sets).

An episode holds T tasks: support_x, support_y (T, K, 1) and query_x, query_y (T, Q, 1), float. "ways" is the
output dimension of the regressor, 1; channels = image_size = 1 make the MLP backbone's input width 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from fewshot.data.base import DataError, Episode
from fewshot.data.dataset import task_source


def _interval(name: str, value: Sequence[float]) -> tuple[float, float]:
    lo, hi = (float(v) for v in value)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
        raise DataError(f"dataset.{name}={list(value)}: must be [low, high] with low <= high")
    return lo, hi


class SinusoidSampler:
    """Draws T sinusoid tasks at once on `device` from its own torch.Generator (same seed, same tasks)."""

    def __init__(
        self,
        shots: int,
        queries: int,
        amplitude: tuple[float, float],
        phase: tuple[float, float],
        x_range: tuple[float, float],
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.shots, self.queries = shots, queries
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.last_amplitude: torch.Tensor | None = None  # (T,) of the last draw, for plots
        self.last_phase: torch.Tensor | None = None

    def _uniform(self, bounds: tuple[float, float], *shape: int) -> torch.Tensor:
        lo, hi = bounds
        return torch.rand(shape, generator=self.generator, device=self.device) * (hi - lo) + lo

    def sample_with_params(self, tasks: int) -> tuple[Episode, torch.Tensor, torch.Tensor]:
        """(episode, amplitude (T,), phase (T,)): the tasks and the parameters that define them."""
        amplitude = self._uniform(self.amplitude, tasks, 1, 1)
        phase = self._uniform(self.phase, tasks, 1, 1)
        x = self._uniform(self.x_range, tasks, self.shots + self.queries, 1)
        y = amplitude * torch.sin(x - phase)
        k = self.shots
        support_x, query_x, support_y, query_y = (t.contiguous() for t in (x[:, :k], x[:, k:], y[:, :k], y[:, k:]))
        episode = Episode(support_x=support_x, support_y=support_y, query_x=query_x, query_y=query_y, ways=1)
        self.last_amplitude, self.last_phase = amplitude.view(-1), phase.view(-1)
        return episode, self.last_amplitude, self.last_phase

    def sample(self, tasks: int, out: Optional[Episode] = None) -> Episode:
        """T tasks; with `out`, copied into its tensors (a CUDA graph's static input), from the same draw."""
        episode = self.sample_with_params(tasks)[0]
        return episode if out is None else out.copy_(episode)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class SinusoidTasks:
    """The sinusoid task distribution: a TaskSource (fewshot.data.dataset) of regression tasks with real-valued
    targets, so MAML's loss and the reported metric are the MSE; the input is one number (1 x 1 x 1)."""

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    name: str = "sinusoid"
    channels: int = 1
    image_size: int = 1

    @staticmethod
    def function(x: torch.Tensor, amplitude: torch.Tensor, phase: torch.Tensor) -> torch.Tensor:
        """The ground truth of a task: amplitude * sin(x - phase)."""
        return amplitude * torch.sin(x - phase)

    def check_episode(self, split: str, ways: int, shots: int, queries: int) -> None:
        if split not in ("train", "val", "test"):
            raise DataError(f"dataset {self.name} has no split {split!r}; it has ['test', 'train', 'val']")
        if ways != 1:
            raise DataError(
                f"episode.ways={ways}: sinusoid regression has one output, set episode.ways=1 (and eval.ways=null)"
            )
        for key, value in (("episode.shots", shots), ("episode.queries", queries)):
            if value < 1:
                raise DataError(f"{key}={value}: must be at least 1")

    def sampler(self, split: str, ways: int, shots: int, queries: int, device, seed: int) -> SinusoidSampler:
        self.check_episode(split, ways, shots, queries)
        return SinusoidSampler(shots, queries, self.amplitude, self.phase, self.x_range, device=device, seed=seed)


@task_source
def load_sinusoid(
    amplitude: Sequence[float] = (0.1, 5.0),
    phase: Sequence[float] = (0.0, math.pi),
    x_range: Sequence[float] = (-5.0, 5.0),
) -> SinusoidTasks:
    """Finn et al.'s defaults: amplitude in [0.1, 5.0], phase in [0, pi], x in [-5, 5]."""
    return SinusoidTasks(_interval("amplitude", amplitude), _interval("phase", phase), _interval("x_range", x_range))
