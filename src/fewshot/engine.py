"""The train and evaluate story: compose -> build -> meta-train -> checkpoint -> test -> results.

Nothing here knows which algorithm runs: every algorithm answers algo(episode, train) -> AlgoOutput.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from fewshot.algorithms.base import Algorithm
from fewshot.atomic import atomic_write_text, remove_stale_temporaries
from fewshot.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fewshot.config import META_KEYS
from fewshot.data.base import FewShotDataset
from fewshot.data.sampler import EpisodeSampler, fixed_episodes
from fewshot.device import available_memory, resolve_device
from fewshot.errors import ConfigError, FewshotError
from fewshot.runlock import hold_run_folder
from fewshot.schedule import make_scheduler

SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}
# torch's CPU generator keeps 32 bits of a seed, and the split streams are seed * 1000 + offset: beyond this bound
# two seeds would share streams (seed=2**40 trained bit for bit as seed=0). Seeds are refused past it.
MAX_SEED = (2**32 - 1 - max(SPLIT_OFFSET.values())) // 1000


def check_seed(seed: object, key: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"{key}={seed}: seeds are integers from 0 to {MAX_SEED:,}; larger ones would repeat the "
                          "random streams of smaller ones (torch keeps 32 bits of a seed)")


def episode_seed(seed: int, split: str) -> int:
    """Each split draws its tasks from its own stream; val and test are fixed sets per seed."""
    return seed * 1000 + SPLIT_OFFSET[split]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(node: DictConfig) -> DictConfig:
    """The node without the keys that only name a choice (they are not constructor arguments)."""
    return OmegaConf.create({k: v for k, v in node.items() if k not in META_KEYS})


def check_config(cfg: DictConfig) -> None:
    """Reject out-of-range numbers before any work, naming the setting."""
    positive = {
        "episode.ways": cfg.episode.ways, "episode.shots": cfg.episode.shots, "episode.queries": cfg.episode.queries,
        "trainer.meta_batch_size": cfg.trainer.meta_batch_size, "trainer.iterations": cfg.trainer.iterations,
        "trainer.meta_lr": cfg.trainer.meta_lr, "trainer.val_every": cfg.trainer.val_every,
        "trainer.val_episodes": cfg.trainer.val_episodes, "trainer.checkpoint_every": cfg.trainer.checkpoint_every,
        "trainer.log_every": cfg.trainer.log_every,
        "eval.episodes": cfg.eval.episodes, "eval.meta_batch_size": cfg.eval.meta_batch_size,
    }
    for key in ("inner_lr", "inner_steps", "eval_inner_steps"):
        if key in cfg.algo:
            positive[f"algo.{key}"] = cfg.algo[key]
    for key, value in positive.items():
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}={value}: must be a positive number")
    for key in ("ways", "queries"):
        value = cfg.eval.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"eval.{key}={value}: must be a positive number or null")
    clip = cfg.trainer.grad_clip
    if clip is not None and not (math.isfinite(clip) and clip > 0):  # a negative norm would flip the gradient
        raise ConfigError(f"trainer.grad_clip={clip}: must be a positive gradient norm, or null for no clipping")
    for key, value in (("eval.episodes", cfg.eval.episodes), ("trainer.val_episodes", cfg.trainer.val_episodes)):
        if value < 2:
            raise ConfigError(f"{key}={value}: at least 2 episodes, since a 95% interval from one episode is undefined")
    check_seed(cfg.seed)


@dataclass
class Run:
    """Everything built from a config, in plain objects."""

    device: torch.device
    dataset: FewShotDataset
    algo: Algorithm


# Datasets whose tasks are regression (a real-valued target): only an algorithm with algo.loss=mse fits them.
REGRESSION_DATASETS = ("sinusoid",)


def check_compatible(cfg: DictConfig) -> None:
    """Refuse dataset/algorithm/backbone combinations that would fail deep in PyTorch, or train on nonsense
    (cross-entropy over one output is always 0), before anything is built."""
    regression = cfg.dataset.name in REGRESSION_DATASETS
    loss = cfg.algo.get("loss")
    if regression and loss is None:
        raise ConfigError(f"algo={cfg.algo.name} classifies, but dataset={cfg.dataset.name} is a regression task: use "
                          "algo=maml algo.loss=mse or algo=pretrain (e.g. experiment=maml_sinusoid_k10)")
    if regression and loss != "mse":
        raise ConfigError(f"algo.loss={loss} on dataset={cfg.dataset.name}, a regression task: set algo.loss=mse")
    if not regression and loss == "mse":
        raise ConfigError(f"algo.loss=mse on dataset={cfg.dataset.name}, a classification task: "
                          "set algo.loss=cross_entropy")
    if not regression and cfg.backbone.name == "mlp_sinusoid":
        raise ConfigError(f"backbone=mlp_sinusoid is the sinusoid regressor; dataset={cfg.dataset.name} needs an "
                          "image backbone (conv4, conv4_pool or mlp)")


def build(cfg: DictConfig, device: Optional[torch.device] = None) -> Run:
    """Dataset, backbone and algorithm from the config; the only place configs become objects."""
    check_config(cfg)
    check_compatible(cfg)
    device = device or resolve_device(cfg.device.name)
    dataset: FewShotDataset = instantiate(_plain(cfg.dataset), _convert_="all")
    for split in ("train", "val", "test"):
        dataset.check_episode(split, *episode_shape(cfg, split))
    backbone = functools.partial(
        instantiate(_plain(cfg.backbone), _convert_="all"), in_channels=dataset.channels, image_size=dataset.image_size
    )
    algo: Algorithm = instantiate(_plain(cfg.algo), _convert_="all", backbone=backbone, ways=cfg.episode.ways)
    eval_ways = episode_shape(cfg, "test")[0]
    if algo.fixed_ways is not None and eval_ways != algo.fixed_ways:
        raise ConfigError(f"eval.ways={eval_ways} but {cfg.algo.name}'s classifier head has {algo.fixed_ways} outputs; "
                          "it tests with the ways it trained on: drop eval.ways")
    return Run(device=device, dataset=dataset, algo=algo.to(device))


def warn_if_graph_too_big(run: Run, cfg: DictConfig) -> None:
    """A one-line warning when an algorithm's estimated training graph (MAML's second order grows with
    inner_steps) exceeds the device's free memory, before the run spends minutes finding out."""
    estimate = getattr(run.algo, "graph_bytes", None)
    if estimate is None:
        return
    ways, shots, queries = episode_shape(cfg, "train")
    image = (run.dataset.channels, run.dataset.image_size, run.dataset.image_size)
    try:
        need = estimate(image, ways * shots, ways * queries, cfg.trainer.meta_batch_size, run.device)
        have = available_memory(run.device)
    except Exception:  # an estimate must never stop a run
        return
    if need > have:
        print(f"fewshot: warning: {cfg.algo.name}'s training graph needs about {need / 2**30:.1f} GiB "
              f"(algo.inner_steps={cfg.algo.inner_steps}), more than the {have / 2**30:.1f} GiB free on {run.device}; "
              "set algo.chunk_size to fewer tasks or algo.first_order=true", file=sys.stderr)


def episode_shape(cfg: DictConfig, split: str) -> tuple[int, int, int]:
    """(ways, shots, queries) of a split's tasks: validation and test may set their own ways and queries."""
    if split == "train":
        return cfg.episode.ways, cfg.episode.shots, cfg.episode.queries
    return cfg.eval.ways or cfg.episode.ways, cfg.episode.shots, cfg.eval.queries or cfg.episode.queries


def make_sampler(run: Run, cfg: DictConfig, split: str, seed: int) -> EpisodeSampler:
    return run.dataset.sampler(split, *episode_shape(cfg, split), device=run.device, seed=seed)


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


def checkpoint_state(cfg: DictConfig, algo: Algorithm, optimizer, iteration: int, best: dict, sampler: EpisodeSampler,
                     progress: Optional[dict] = None, scheduler=None) -> dict:
    """Everything needed to continue bit for bit: weights, optimizer, iteration, best metric, every RNG
    state, the sampler's generator, the partial logging window, and the config that built the run."""
    return {
        "algo": cfg.algo.name,
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "model": algo.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "iteration": iteration,
        "best": dict(best),
        "progress": dict(progress or {}),
        "rng": rng_state(),
        "sampler": sampler.state_dict(),
        "config": OmegaConf.to_container(cfg, resolve=True),
        "config_source": OmegaConf.to_container(cfg, resolve=False),
    }


class Interrupted(FewshotError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalGuard:
    """What SIGTERM/SIGINT do at each stage of a run.

    In the training loop the first signal is only recorded (`received`): the loop finishes its iteration,
    checkpoints and raises Interrupted. Where there is nothing to save (preparing data, the final test),
    `immediate` holds the rest of the message and the signal stops the run at once. A second signal stops it at
    once too, naming the last checkpoint written (`last_checkpoint`) instead of writing a new one mid-step."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.immediate: Optional[str] = None
        self.last_checkpoint: str = "no checkpoint was written yet"

    def __bool__(self) -> bool:
        return bool(self.received)

    def handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.immediate is not None:
            raise Interrupted(f"{name} {self.immediate}", signum)
        if self.received:
            raise Interrupted(f"second {name}: stopped at once without a new checkpoint; {self.last_checkpoint}",
                              signum)
        self.received.append(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGTERM and SIGINT (how clusters preempt) into a SignalGuard the run consults, so it stops at a clean
    point and checkpoints instead of dying mid-step."""
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield guard
        return
    previous = {s: signal.signal(s, guard.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    stopping = False
    try:
        yield guard
    except Interrupted:
        stopping = True
        raise
    finally:
        for s, h in previous.items():
            # An interrupted run is on its way out: one more Ctrl-C while it exits must not end in a traceback.
            signal.signal(s, signal.SIG_IGN if stopping else h)


def find_resume_checkpoint(ckpt_dir: Path) -> Optional[dict]:
    """The newest readable of last.pt and previous.pt, or None when the folder holds neither."""
    errors = []
    for name in ("last.pt", "previous.pt"):
        path = ckpt_dir / name
        if path.exists():
            try:
                return load_checkpoint(path)
            except CheckpointError as e:
                errors.append(str(e))
                print(f"fewshot: warning: {e}; trying an older checkpoint", file=sys.stderr)
    if errors:
        raise CheckpointError(f"no readable checkpoint to resume from in {ckpt_dir}: {'; '.join(errors)}")
    return None


def save_last(ckpt_dir: Path, state: dict) -> None:
    """last.pt, keeping the one before it as previous.pt in case last.pt is damaged later."""
    last = ckpt_dir / "last.pt"
    if last.exists():
        os.replace(last, ckpt_dir / "previous.pt")
    save_checkpoint(last, state)


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Meta-train, validate and checkpoint, then test the best checkpoint; returns results.json's content.

    Resumes from run_dir/checkpoints/last.pt when it exists (or fails when resume=true and it does not).
    The run owns its folder throughout: a second run on it stops with RunFolderInUse instead of mixing files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with hold_run_folder(run_dir, "fewshot-train"):
        # Locked: no other live run writes here, so our files' temporaries are a killed writer's leftovers.
        remove_stale_temporaries(run_dir / "checkpoints")
        remove_stale_temporaries(run_dir, "metrics.csv", "results.json", "results.md")
        write_hydra_files(run_dir, cfg)
        return _train_locked(cfg, run_dir)


def _train_locked(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    with stop_on_signals() as signals:
        signals.immediate = "while preparing the run: nothing was trained yet; run the same command again"
        return _meta_train(cfg, run_dir, signals)


# A training loss this many times its first value (or more than this, for a first loss below 1) means the run
# has diverged: it will not come back, and an infinite loss may take long to appear (meta_lr=1e9 reached 1.7e19).
DIVERGED = 100.0


def _meta_train(cfg: DictConfig, run_dir: Path, signals: SignalGuard) -> dict[str, Any]:
    seed_everything(cfg.seed)
    run = build(cfg)
    algo, t = run.algo, cfg.trainer
    print(f"fewshot: {cfg.name} on {run.device}, {sum(p.numel() for p in algo.parameters()):,} parameters, run folder {run_dir}")
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg))
        return {}
    warn_if_graph_too_big(run, cfg)

    train_sampler = make_sampler(run, cfg, "train", episode_seed(cfg.seed, "train"))
    val_sampler = make_sampler(run, cfg, "val", episode_seed(cfg.seed, "val"))
    optimizer = torch.optim.Adam(algo.parameters(), lr=t.meta_lr)
    scheduler = make_scheduler(cfg.get("schedule"), optimizer)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.csv"
    best = {"val_score": -math.inf, "iteration": 0}  # val_score: accuracy, or -MSE for regression
    # Running sums since the last validation, and the time spent training (validation excluded).
    progress = {"loss": 0.0, "acc": 0.0, "n": 0, "train_seconds": 0.0, "metric": "acc"}
    start = 1

    state = find_resume_checkpoint(ckpt_dir)
    if state is None and cfg.resume:
        raise CheckpointError(f"resume=true but {ckpt_dir} holds no last.pt; point hydra.run.dir at the run folder to resume")
    if state is not None:
        check_same_run(state, cfg, ckpt_dir / "last.pt")
        algo.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state.get("scheduler") or scheduler.state_dict())
        train_sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        best, progress, start = state["best"], state["progress"], state["iteration"] + 1
        truncate_metrics(metrics_path, state["iteration"])
        signals.last_checkpoint = f"the last checkpoint is {ckpt_dir / 'last.pt'} (iteration {state['iteration']})"
        if start > t.iterations:
            print(f"fewshot: {run_dir} finished training at iteration {state['iteration']}; testing best.pt only")
        else:
            print(f"fewshot: resuming {run_dir} at iteration {start} of {t.iterations}")
    logger = make_logger(cfg.logger, run_dir)
    algo.train()

    signals.immediate = None  # from here the first signal checkpoints at the end of its iteration
    bar = tqdm(range(start, t.iterations + 1), initial=start - 1, total=t.iterations, desc="meta-train", unit="it",
               dynamic_ncols=True)
    tic, tic_it = time.perf_counter(), start - 1  # training time and tasks/s since the last validation
    for it in bar:
        episode = train_sampler.sample(t.meta_batch_size)  # support_x (T, ways*shots, C, H, W)
        out = algo(episode, train=True)
        loss = out.loss.item()
        first = progress.setdefault("first_loss", loss)
        # Checked before the step, so the weights stay the last good ones.
        if not math.isfinite(loss) or abs(loss) > DIVERGED * max(abs(first), 1.0):
            what = f"became {loss}" if not math.isfinite(loss) else f"reached {loss:.3g} (it started at {first:.3g})"
            raise FewshotError(f"training loss {what} at iteration {it}: the run diverged and stopped; the last good "
                               f"checkpoint is in {ckpt_dir}. Lower trainer.meta_lr or algo.inner_lr")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(algo.parameters(), t.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

        progress["loss"] += loss
        progress["metric"] = out.metric
        progress["acc"] += out.per_task().mean().item()
        progress["n"] += 1
        if it % t.log_every == 0 or it == t.iterations:
            rate = (it - tic_it) * t.meta_batch_size / max(time.perf_counter() - tic, 1e-9)
            bar.set_postfix({"loss": f"{progress['loss'] / progress['n']:.3f}",
                             progress["metric"]: f"{progress['acc'] / progress['n']:.3f}", "tasks/s": f"{rate:.0f}"})

        if it % t.val_every == 0 or it == t.iterations:
            progress["train_seconds"] += time.perf_counter() - tic
            val = evaluate(algo, val_sampler, t.val_episodes, cfg.eval.meta_batch_size, episode_seed(cfg.seed, "val"), desc="validate")
            m = progress["metric"]
            row = {"iteration": it, "train_loss": progress["loss"] / progress["n"], f"train_{m}": progress["acc"] / progress["n"],
                   f"val_{m}": val[f"{m}_mean"], "val_ci95": val[f"{m}_ci95"], "train_seconds": round(progress["train_seconds"], 3)}
            _append_csv(metrics_path, row)
            if logger:
                for key in ("train_loss", f"train_{m}", f"val_{m}"):
                    logger.add_scalar(key, row[key], it)
            progress.update(loss=0.0, acc=0.0, n=0)
            if validation_score(val) > best["val_score"]:
                best = {"val_score": validation_score(val), f"val_{m}": val[f"{m}_mean"], "iteration": it}
                save_checkpoint(ckpt_dir / "best.pt", checkpoint_state(cfg, algo, optimizer, it, best, train_sampler, progress, scheduler))
            shown = (f"{100 * val['acc_mean']:.2f} ± {100 * val['acc_ci95']:.2f}%" if m == "acc"
                     else f"{val['mse_mean']:.4f} ± {val['mse_ci95']:.4f}")
            tqdm.write(f"iteration {it}: val {m} {shown} (best at iteration {best['iteration']})")
            tic, tic_it = time.perf_counter(), it
        if it % t.checkpoint_every == 0 or it == t.iterations or signals:
            # Time is banked only at validations; a checkpoint between them records it too.
            snapshot = dict(progress, train_seconds=progress["train_seconds"] + time.perf_counter() - tic)
            save_last(ckpt_dir, checkpoint_state(cfg, algo, optimizer, it, best, train_sampler, snapshot, scheduler))
            signals.last_checkpoint = f"the last checkpoint is {ckpt_dir / 'last.pt'} (iteration {it})"
        if signals:
            bar.close()
            name = signal.Signals(signals.received[0]).name
            raise Interrupted(f"{name} at iteration {it}: checkpoint written to {ckpt_dir / 'last.pt'}; "
                              f"resume with the same command and hydra.run.dir={run_dir}", signals.received[0])
    bar.close()
    if start <= t.iterations:
        progress["train_seconds"] += time.perf_counter() - tic

    # Test the best validation checkpoint, as the papers do. Nothing to save here: a signal stops at once.
    signals.immediate = (f"during the test: training is complete ({ckpt_dir / 'best.pt'}); run the same command "
                         f"with hydra.run.dir={run_dir} to test it again")
    algo.load_state_dict(load_checkpoint(ckpt_dir / "best.pt")["model"])
    test_sampler = make_sampler(run, cfg, "test", episode_seed(cfg.seed, "test"))
    test = evaluate(algo, test_sampler, cfg.eval.episodes, cfg.eval.meta_batch_size, episode_seed(cfg.seed, "test"), desc="test")
    results = make_results(cfg, test, train_seconds=progress["train_seconds"], best=best, device=run.device)
    write_results(run_dir, results)
    if logger:
        for key in ("acc_mean", "mse_mean"):
            if key in test:
                logger.add_scalar(f"test_{key.split('_')[0]}", test[key], t.iterations)
        logger.close()
    plot_curve(run_dir)
    return results


# Settings that may change between a run and its resumption: where things live, how it is
# evaluated, and how long it trains (training longer continues the same trajectory).
# Validation tasks (eval.ways, eval.queries, trainer.val_episodes) may not change: they would put numbers of
# another meaning in one metrics.csv column and pick best.pt across them. Test-only settings may.
RESUMABLE_CHANGES = ("resume", "device.", "data_root", "cache_dir", "dataset.root", "dataset.cache_dir",
                     "trainer.iterations", "trainer.log_every", "trainer.val_every", "trainer.checkpoint_every",
                     "eval.episodes", "eval.meta_batch_size", "logger", "dry_run")


def upgrade_config(config: dict) -> dict:
    """A checkpoint's saved config, completed with what its settings meant before a key existed, so an old
    checkpoint rebuilds the model it was trained as (and resuming it with today's defaults is refused)."""
    config = dict(config)
    config.setdefault("schedule", {"_target_": None, "name": "constant"})  # before schedules: constant lr
    algo = config.get("algo")
    if isinstance(algo, dict) and algo.get("name") in ("matching", "matching_fce") and "similarity" not in algo:
        # Before algo.similarity, Matching Networks used the plain cosine, unscaled.
        config["algo"] = {**algo, "similarity": "cosine", "scale": 1.0, "learn_scale": False}
    return config


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def check_same_run(state: dict, cfg: DictConfig, path: Path) -> None:
    """Refuse to resume a run folder with other settings than the ones requested: continuing another
    experiment's weights would silently mix two runs."""
    old = _flatten(upgrade_config(state["config"]))
    new = _flatten(OmegaConf.to_container(cfg, resolve=True))
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and not k.startswith(RESUMABLE_CHANGES)]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed[:4]) + (" ..." if len(changed) > 4 else "")
        raise CheckpointError(f"{path} holds a run with other settings ({diffs}); use a new run folder "
                              "(the default) or the run's own settings to resume it")
    if state["iteration"] > cfg.trainer.iterations:
        raise CheckpointError(f"{path} is already at iteration {state['iteration']}, past trainer.iterations={cfg.trainer.iterations}")


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metrics.csv rows written after the checkpoint we resume from (and any half-written line)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = lines[:1] + [ln for ln in lines[1:] if ln.split(",")[0].isdigit() and int(ln.split(",")[0]) <= iteration
                        and len(ln.split(",")) == len(lines[0].split(","))]
    atomic_write_text(path, "\n".join(kept) + "\n")


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
    from fewshot.data.lake import lake_episode, lake_report, lake_zip_path, load_lake_runs

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
