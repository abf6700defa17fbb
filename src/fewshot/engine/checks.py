"""The build step's checks: a composed config refused in one line, before anything is built, when a number is out
of range, a seed would repeat another's random streams, or the dataset, algorithm and backbone do not fit."""

from __future__ import annotations

import math

from omegaconf import DictConfig

from fewshot.errors import ConfigError

SPLIT_OFFSET = {"train": 0, "val": 1, "test": 2}


# torch's CPU generator keeps 32 bits of a seed, and the split streams are seed * 1000 + offset: beyond this bound
# two seeds would share streams (seed=2**40 trained bit for bit as seed=0). Seeds are refused past it.
MAX_SEED = (2**32 - 1 - max(SPLIT_OFFSET.values())) // 1000


def check_seed(seed: object, key: str = "seed") -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(
            f"{key}={seed}: seeds are integers from 0 to {MAX_SEED:,}; larger ones would repeat the "
            "random streams of smaller ones (torch keeps 32 bits of a seed)"
        )


def episode_seed(seed: int, split: str) -> int:
    """Each split draws its tasks from its own stream; val and test are fixed sets per seed."""
    return seed * 1000 + SPLIT_OFFSET[split]


def check_config(cfg: DictConfig) -> None:
    """Reject out-of-range numbers before any work, naming the setting."""
    positive = {
        "episode.ways": cfg.episode.ways,
        "episode.shots": cfg.episode.shots,
        "episode.queries": cfg.episode.queries,
        "trainer.meta_batch_size": cfg.trainer.meta_batch_size,
        "trainer.iterations": cfg.trainer.iterations,
        "trainer.meta_lr": cfg.trainer.meta_lr,
        "trainer.val_every": cfg.trainer.val_every,
        "trainer.val_episodes": cfg.trainer.val_episodes,
        "trainer.checkpoint_every": cfg.trainer.checkpoint_every,
        "trainer.log_every": cfg.trainer.log_every,
        "eval.episodes": cfg.eval.episodes,
        "eval.meta_batch_size": cfg.eval.meta_batch_size,
        "eval.ensemble": cfg.eval.get("ensemble", 1),
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
    cuda_graph_mode(cfg.trainer.get("cuda_graph", "auto"))
    weights = cfg.eval.get("weights", "best")
    if weights not in ("best", "last"):
        raise ConfigError(f"eval.weights={weights}: choose best (best.pt) or last (the final weights)")
    if weights == "last" and cfg.eval.get("ensemble", 1) > 1:
        raise ConfigError(
            f"eval.weights=last with eval.ensemble={cfg.eval.ensemble}: the ensemble is of the best validation "
            "checkpoints; set eval.weights=best or eval.ensemble=1"
        )
    for key, value in (("eval.episodes", cfg.eval.episodes), ("trainer.val_episodes", cfg.trainer.val_episodes)):
        if value < 2:
            raise ConfigError(f"{key}={value}: at least 2 episodes, since a 95% interval from one episode is undefined")
    check_seed(cfg.seed)


def cuda_graph_mode(value: object) -> str:
    """trainer.cuda_graph as off, on or auto (true and false, as YAML may write them, mean on and off)."""
    mode = {"true": "on", "false": "off"}.get(str(value).lower(), str(value).lower())
    if mode not in ("off", "on", "auto"):
        raise ConfigError(f"trainer.cuda_graph={value}: choose off, on or auto")
    return mode


# Datasets whose tasks are regression (a real-valued target): only an algorithm with algo.loss=mse fits them.
REGRESSION_DATASETS = ("sinusoid",)


def check_compatible(cfg: DictConfig) -> None:
    """Refuse dataset/algorithm/backbone combinations that would fail deep in PyTorch, or train on nonsense
    (cross-entropy over one output is always 0), before anything is built."""
    regression = cfg.dataset.name in REGRESSION_DATASETS
    loss = cfg.algo.get("loss")
    if regression and loss is None:
        raise ConfigError(
            f"algo={cfg.algo.name} classifies, but dataset={cfg.dataset.name} is a regression task: use "
            "algo=maml algo.loss=mse or algo=pretrain (e.g. experiment=maml_sinusoid_k10)"
        )
    if regression and loss == "cross_entropy":
        raise ConfigError(
            f"algo.loss={loss} on dataset={cfg.dataset.name}, a regression task: set algo.loss=mse (or auto)"
        )
    if not regression and loss == "mse":
        raise ConfigError(
            f"algo.loss=mse on dataset={cfg.dataset.name}, a classification task: set algo.loss=cross_entropy"
        )
    if not regression and cfg.backbone.name == "mlp_sinusoid":
        raise ConfigError(
            f"backbone=mlp_sinusoid is the sinusoid regressor; dataset={cfg.dataset.name} needs an "
            "image backbone (conv4, conv4_pool or mlp)"
        )
