"""What a per-task score means: its name in results (acc_mean, mse_mean), which way is better, how it is shown.

Algorithms report `AlgoOutput.metric` by name; everything that validates, picks best.pt or prints a number asks
the Metric, so the engine has no branch per metric."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Metric:
    name: str  # results keys: <name>_mean, <name>_ci95, step_<name>; metrics.csv: train_<name>, val_<name>
    higher_is_better: bool
    percent: bool  # shown as a percentage (accuracy) or as it is (MSE)
    label: str

    def score(self, mean: float) -> float:
        """Higher is better, whatever the metric: what best.pt and a sweeper maximise."""
        return mean if self.higher_is_better else -mean

    def show(self, mean: float, ci: Optional[float]) -> str:
        if self.percent:
            return f"{100 * mean:.2f}" + ("" if ci is None else f" ± {100 * ci:.2f}") + "%"
        return f"{mean:.4f}" + ("" if ci is None else f" ± {ci:.4f}")


ACCURACY = Metric("acc", higher_is_better=True, percent=True, label="accuracy")
MSE = Metric("mse", higher_is_better=False, percent=False, label="MSE")
METRICS = {m.name: m for m in (ACCURACY, MSE)}


def episode_summary(values, metric: str) -> dict:
    """results.json's numbers for a 1-d float64 tensor of per-episode scores: the episode count, the metric's name,
    <metric>_mean and <metric>_ci95 = 1.96 * std / sqrt(episodes) (0 for a single episode)."""
    episodes = len(values)
    std = values.std(unbiased=True).item() if episodes > 1 else 0.0
    return {
        "episodes": episodes,
        "metric": metric,
        f"{metric}_mean": values.mean().item(),
        f"{metric}_ci95": 1.96 * std / math.sqrt(episodes),
    }
