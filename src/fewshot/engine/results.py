"""What a run writes besides checkpoints: results.json/md, metrics.csv, .hydra/, TensorBoard, the curve."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from fewshot.atomic import atomic_write_text
from fewshot.engine.builder import episode_shape
from fewshot.errors import ConfigError


def make_logger(kind: Optional[str], run_dir: Path):
    """Optional TensorBoard writer; metrics.csv is always written."""
    if not kind:
        return None
    if kind != "tensorboard":
        raise ConfigError(f"logger={kind!r}: the only logger is tensorboard (or null)")
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install 'fewshot[tensorboard]'") from e
    return SummaryWriter(str(run_dir / "tensorboard"))


def plot_curve(run_dir: Path) -> None:
    try:
        from fewshot.plots import plot_learning_curve
    except ImportError:  # matplotlib missing: the numbers are in metrics.csv anyway
        return
    try:
        plot_learning_curve(run_dir)
    except Exception as e:  # a plot must never cost a finished run its results
        print(f"fewshot: warning: learning-curve plot failed: {e}", file=sys.stderr)


def make_results(cfg: DictConfig, test: dict, train_seconds: Optional[float], best: dict, device: torch.device) -> dict[str, Any]:
    # ways/shots/queries describe the test tasks (the paper cell); training tasks may differ (ProtoNets train 60-way).
    ways, shots, queries = episode_shape(cfg, "test")
    return {
        "name": cfg.name,
        "algo": cfg.algo.name,
        "dataset": cfg.dataset.name,
        "dataset_split": cfg.dataset.get("split"),
        "backbone": cfg.backbone.name,
        "ways": ways,
        "shots": shots,
        "queries": queries,
        "train_episode": {"ways": cfg.episode.ways, "shots": cfg.episode.shots, "queries": cfg.episode.queries},
        "seed": cfg.seed,
        "iterations": cfg.trainer.iterations,
        "meta_batch_size": cfg.trainer.meta_batch_size,
        "train_seconds": None if train_seconds is None else round(train_seconds, 3),
        "best_val": best,
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "schedule": cfg.schedule.name if "schedule" in cfg else "constant",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": run_command(),
        "test": test,
        "paper": OmegaConf.to_container(cfg.paper, resolve=True) if "paper" in cfg else None,
    }


def write_hydra_files(run_dir: Path, cfg: DictConfig) -> None:
    """.hydra/{config,hydra,overrides}.yaml as Hydra writes them, but only once this run holds the folder
    (conf/hydra/default.yaml turns Hydra's own early copy off). Nothing to write outside a Hydra job."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    folder = run_dir / ".hydra"
    folder.mkdir(exist_ok=True)
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(cfg))
    atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_cfg}))
    atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))


def run_command() -> Optional[str]:
    """The command line that gives this run again (the job's own overrides under a sweep), or None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    prog = "fewshot-eval" if hydra_cfg.job.config_name == "eval" else "fewshot-train"
    return " ".join([prog, *hydra_cfg.overrides.task])


def results_markdown(results: dict) -> str:
    test = results["test"]
    if "mse_mean" in test:  # regression: no accuracy, no paper accuracy
        steps = ", ".join(f"{i}: {v:.4f}" for i, v in enumerate(test.get("step_mse", [])))
        return (f"| algo | dataset | shots | seed | test tasks | MSE |\n|---|---|---|---|---|---|\n"
                f"| {results['algo']} | {results['dataset']} | {results['shots']} | {results['seed']} | {test['episodes']} | "
                f"{test['mse_mean']:.4f} ± {test['mse_ci95']:.4f} |\n" + (f"\nMSE after each inner step: {steps}\n" if steps else ""))
    acc = f"{100 * test['acc_mean']:.2f} ± {100 * test['acc_ci95']:.2f}"
    paper = results.get("paper") or {}
    paper_s = f"{paper['acc']:.2f}" + (f" ± {paper['ci95']:.2f}" if paper.get("ci95") is not None else "") if paper.get("acc") is not None else "–"
    lines = [
        "| algo | dataset | backbone | ways | shots | queries | seed | test episodes | accuracy (%) | paper (%) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {results['algo']} | {results['dataset']} | {results['backbone']} | {results['ways']} | {results['shots']} | "
        f"{results['queries']} | {results['seed']} | {test['episodes']} | {acc} | {paper_s} |",
    ]
    if "step_acc" in test:
        steps = ", ".join(f"{i}: {100 * a:.2f}" for i, a in enumerate(test["step_acc"]))
        lines += ["", f"Accuracy (%) after each inner step: {steps}"]
    return "\n".join(lines) + "\n"


def write_results(run_dir: Path, results: dict) -> None:
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    table = results_markdown(results)
    atomic_write_text(run_dir / "results.md", table)
    print(table, end="")


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
