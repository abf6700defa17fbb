"""The build step: check a composed config, then turn it into the run's device, task source and algorithm."""

from __future__ import annotations

import functools
import math
import random
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshot.algorithms.base import Algorithm
from fewshot.config import META_KEYS
from fewshot.data.base import FewShotDataset
from fewshot.data.sampler import EpisodeSampler
from fewshot.device import available_memory, resolve_device
from fewshot.errors import ConfigError

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
