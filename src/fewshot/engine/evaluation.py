"""Accuracy (or MSE) over fixed task sets: validation, the final test, and fewshot-eval of a checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fewshot.algorithms.base import Algorithm
from fewshot.atomic import atomic_write_text
from fewshot.checkpoint import CheckpointError, load_checkpoint
from fewshot.data.sampler import EpisodeSampler, fixed_episodes
from fewshot.engine.builder import (
    SPLIT_OFFSET,
    Run,
    build,
    check_seed,
    episode_seed,
    make_sampler,
)
from fewshot.engine.checkpoints import upgrade_config
from fewshot.engine.results import make_results, write_hydra_files, write_results
from fewshot.errors import ConfigError
from fewshot.runlock import hold_run_folder


def evaluate(algo: Algorithm, sampler: EpisodeSampler, episodes: int, batch: int, seed: int, desc: str = "eval") -> dict[str, Any]:
    """Accuracy over a fixed set of `episodes` tasks (the same tasks for the same seed).

    Returns, for classification, fractions in [0, 1]: acc_mean, acc_ci95 = 1.96 * std / sqrt(episodes),
    and, for algorithms that report it, step_acc: mean query accuracy before adaptation and after each
    inner step. Regression reports mse_mean, mse_ci95 and step_mse the same way."""
    was_training = algo.training
    algo.eval()
    values, steps, metric = [], [], "acc"
    with tqdm(total=episodes, desc=desc, unit="task", leave=False, dynamic_ncols=True) as bar:
        for episode in fixed_episodes(sampler, episodes, batch, seed):
            out = algo(episode, train=False)
            metric = out.metric
            values.append(out.per_task().detach().cpu())
            if out.per_step() is not None:
                steps.append(out.per_step().detach().cpu())
            bar.update(episode.tasks)
    algo.train(was_training)
    value = torch.cat(values).double()  # (episodes,)
    std = value.std(unbiased=True).item() if episodes > 1 else 0.0
    result: dict[str, Any] = {
        "episodes": episodes,
        f"{metric}_mean": value.mean().item(),
        f"{metric}_ci95": 1.96 * std / math.sqrt(episodes),
    }
    if steps:
        result[f"step_{metric}"] = torch.cat(steps).double().mean(0).tolist()
    return result


def validation_score(val: dict) -> float:
    """Higher is better: accuracy, or the negated MSE for regression."""
    return val["acc_mean"] if "acc_mean" in val else -val["mse_mean"]


def evaluate_checkpoint(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """fewshot-eval: rebuild the run from a checkpoint's own config and test it on `cfg.split`.

    With the training run's seed and episode count it reproduces results.json's test number exactly."""
    with hold_run_folder(out_dir, "fewshot-eval"):  # two evaluations into one folder would overwrite each other
        write_hydra_files(Path(out_dir), cfg)
        return _evaluate_checkpoint_locked(cfg, Path(out_dir))


def _evaluate_checkpoint_locked(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    from fewshot.config import TrainConfig

    if cfg.split not in SPLIT_OFFSET:
        raise ConfigError(f"split={cfg.split!r}: choose one of {', '.join(SPLIT_OFFSET)}")
    if cfg.seed is not None:
        check_seed(cfg.seed)
    state = load_checkpoint(cfg.checkpoint)
    for key in ("algo", "backbone"):
        want = cfg[key].name if cfg.get(key) is not None else None
        if want is not None and want != state.get(key):
            raise CheckpointError(f"{cfg.checkpoint} holds a {key}={state.get(key)} model, not {key}={want}; "
                                  f"pass a {want} checkpoint or drop the {key}= override")
    run_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), upgrade_config(state["config_source"]))
    # Where data lives and which device runs it belong to this machine, not the training one.
    run_cfg.data_root, run_cfg.cache_dir, run_cfg.device = cfg.data_root, cfg.cache_dir, cfg.device
    if cfg.seed is not None:
        run_cfg.seed = cfg.seed
    if cfg.eval.episodes is not None:
        run_cfg.eval.episodes = cfg.eval.episodes
    if cfg.eval.meta_batch_size is not None:
        run_cfg.eval.meta_batch_size = cfg.eval.meta_batch_size
    run = build(run_cfg)
    run.algo.load_state_dict(state["model"])
    if cfg.benchmark is not None:
        return evaluate_benchmark(cfg, run_cfg, run, state, Path(out_dir))
    sampler = make_sampler(run, run_cfg, cfg.split, episode_seed(run_cfg.seed, cfg.split))
    print(f"fewshot: {run_cfg.name} from {cfg.checkpoint} (iteration {state['iteration']}) on {run.device}, "
          f"{run_cfg.eval.episodes} {cfg.split} episodes, seed {run_cfg.seed}")
    test = evaluate(run.algo, sampler, run_cfg.eval.episodes, run_cfg.eval.meta_batch_size,
                    episode_seed(run_cfg.seed, cfg.split), desc=cfg.split)
    results = make_results(run_cfg, test, train_seconds=None, best=state["best"], device=run.device)
    results["checkpoint"] = str(Path(cfg.checkpoint).resolve())
    results["eval_split"] = cfg.split
    write_results(Path(out_dir), results)
    return results


def evaluate_benchmark(cfg: DictConfig, run_cfg: DictConfig, run: Run, state: dict, out_dir: Path) -> dict[str, Any]:
    """benchmark=lake_runs: Lake et al.'s 20 original one-shot runs (20-way, one drawing per class, 20 trials
    each), preprocessed as the model's training data, reported as error rates per run as Lake reports them."""
    from fewshot.data.lake import (
        lake_episode,
        lake_report,
        lake_zip_path,
        load_lake_runs,
    )

    if cfg.benchmark != "lake_runs":
        raise ConfigError(f"benchmark={cfg.benchmark!r}: the only benchmark is lake_runs (or null for the test split)")
    if run_cfg.dataset.name != "omniglot":
        raise ConfigError(f"benchmark=lake_runs needs an Omniglot model; {cfg.checkpoint} was trained on {run_cfg.dataset.name}")
    fixed = getattr(run.algo, "fixed_ways", None)
    if fixed is not None and fixed != 20:
        raise ConfigError(f"benchmark=lake_runs is 20-way but this {run_cfg.algo.name} model has a {fixed}-way head; "
                          "evaluate a 20-way model (e.g. experiment=maml_omniglot_20w1s)")
    runs = load_lake_runs(lake_zip_path(run_cfg.data_root), image_size=run_cfg.dataset.image_size)
    episode = lake_episode(runs, mean=run.dataset.mean, std=run.dataset.std, device=run.device)
    run.algo.eval()
    acc = run.algo(episode, train=False).acc.detach().cpu().tolist()  # (20,) one task per run
    report = lake_report(acc, runs)
    results = make_results(run_cfg, {"episodes": len(runs), "acc_mean": report["mean_accuracy"], "acc_ci95": None},
                           train_seconds=None, best=state["best"], device=run.device)
    results.update(checkpoint=str(Path(cfg.checkpoint).resolve()), eval_split="lake_runs",
                   lake={"error_per_run": report["error_per_run"], "mean_error": report["mean_error"]})
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
    atomic_write_text(out_dir / "results.md", report["markdown"])
    print(report["markdown"], end="")
    # The runs are drawn from images_evaluation: a split that trains on those alphabets may have seen them.
    print(f"Lake's one-shot runs: mean error {report['mean_error']:.2f}% over {len(runs)} runs")
    return results
