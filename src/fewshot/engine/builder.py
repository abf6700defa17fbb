"""The build step: check a composed config, then turn it into the run's device, task source and algorithm."""

from __future__ import annotations

import functools
import random
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fewshot.algorithms.base import Algorithm
from fewshot.config import META_KEYS
from fewshot.data.dataset import TaskSource
from fewshot.data.sampler import EpisodeSampler
from fewshot.device import available_memory, keep_freed_memory, resolve_device, use_channels_last
from fewshot.engine.checks import (  # noqa: F401  (re-exported: the build step's API)
    MAX_SEED,
    REGRESSION_DATASETS,
    SPLIT_OFFSET,
    check_compatible,
    check_config,
    check_seed,
    cuda_graph_mode,
    episode_seed,
)
from fewshot.errors import ConfigError, FewshotError
from fewshot.models.backbones import tracks_running_stats
from fewshot.optim import make_optimizer, make_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(node: DictConfig) -> DictConfig:
    """The node without the keys that only name a choice (they are not constructor arguments)."""
    return OmegaConf.create({k: v for k, v in node.items() if k not in META_KEYS})


@dataclass(frozen=True)
class Shape:
    """The tasks of a split: ways, shots per class, queries per class."""

    ways: int
    shots: int
    queries: int

    def __iter__(self):  # ways, shots, queries = shape
        return iter((self.ways, self.shots, self.queries))


@dataclass(frozen=True)
class Settings:
    """What the loop, evaluation and results need from a config, as plain values (read once, here)."""

    name: str
    seed: int
    iterations: int
    meta_batch_size: int
    val_every: int
    val_episodes: int
    checkpoint_every: int
    log_every: int
    grad_clip: Optional[float]
    cuda_graph: str  # off | on | auto (fewshot.engine.steps)
    test_episodes: int
    eval_batch: int  # tasks per forward pass at validation and test (memory, not results)
    eval_graph: bool  # replay validation/test batches as CUDA graphs (eval.cuda_graph)
    ensemble: int  # test checkpoints whose logits are averaged (eval.ensemble; 1: best.pt)
    test_weights: str  # the checkpoint the test reads, best or last (eval.weights)
    train: Shape
    eval: Shape  # validation and test tasks
    logger: Optional[str] = None
    resume: bool = False
    dry_run: bool = False


@dataclass
class Run:
    """Everything built from a config, in plain objects: nothing below the build step reads a config."""

    device: torch.device
    dataset: TaskSource  # a FewShotDataset, or generated tasks (sinusoids)
    algo: Algorithm
    settings: Optional[Settings] = None
    optimizer: Optional[Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer]] = None
    scheduler: Optional[Callable[[torch.optim.Optimizer], Any]] = None  # None: a constant learning rate
    config: dict = field(default_factory=dict)  # resolved, saved in checkpoints; resume compares it
    config_source: dict = field(default_factory=dict)  # with interpolations, for fewshot-eval to rebuild the run
    record: dict = field(default_factory=dict)  # how results.json names the run: algo, dataset, backbone, paper...


def _plain_dict(node: Optional[DictConfig]) -> Optional[dict]:
    return None if node is None else OmegaConf.to_container(node, resolve=True)


def _make(group: str, node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate a group's choice; a constructor's refusal (ValueError) becomes one line naming the group."""
    try:
        return instantiate(_plain(node), _convert_="all", **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, ValueError) and not isinstance(e.__cause__, FewshotError):
            raise ConfigError(f"{group}={node.name}: {e.__cause__}") from e
        raise


def build(cfg: DictConfig, device: Optional[torch.device] = None) -> Run:
    """Dataset, backbone and algorithm from the config; the only place configs become objects."""
    check_config(cfg)
    check_compatible(cfg)
    device = device or resolve_device(cfg.device.name)
    train_shape, eval_shape = Shape(*episode_shape(cfg, "train")), Shape(*episode_shape(cfg, "test"))
    dataset: TaskSource = _make("dataset", cfg.dataset)
    for split, shape in (("train", train_shape), ("val", eval_shape), ("test", eval_shape)):
        dataset.check_episode(split, *shape)
    backbone = functools.partial(
        _make("backbone", cfg.backbone), in_channels=dataset.channels, image_size=dataset.image_size
    )
    algo: Algorithm = _make("algo", cfg.algo, backbone=backbone, ways=cfg.episode.ways)
    if not algo.running_stats_ok and tracks_running_stats(algo):
        raise ConfigError(
            f"backbone.running_stats=true: algo={cfg.algo.name} normalises with each batch's statistics "
            "(its forward is functional); use it with protonet, matching or siamese, or drop it"
        )
    if algo.fixed_ways is not None and eval_shape.ways != algo.fixed_ways:
        raise ConfigError(
            f"eval.ways={eval_shape.ways} but {cfg.algo.name}'s classifier head has {algo.fixed_ways} outputs; "
            "it tests with the ways it trained on: drop eval.ways"
        )
    if cfg.eval.get("ensemble", 1) > 1 and not algo.reports_logits:
        raise ConfigError(
            f"eval.ensemble={cfg.eval.ensemble} averages the test logits of several checkpoints, which "
            f"algo={cfg.algo.name} does not report (algo=maml_pp does); set eval.ensemble=1"
        )
    nhwc = use_channels_last(cfg.device.get("channels_last"), device, algo.cpu_channels_last)
    memory_format = torch.channels_last if nhwc else torch.preserve_format
    kept = keep_freed_memory(cfg.device.get("keep_freed_memory"), device)
    t = cfg.trainer
    settings = Settings(
        name=cfg.name,
        seed=cfg.seed,
        iterations=t.iterations,
        meta_batch_size=t.meta_batch_size,
        val_every=t.val_every,
        val_episodes=t.val_episodes,
        checkpoint_every=t.checkpoint_every,
        log_every=t.log_every,
        grad_clip=t.grad_clip,
        cuda_graph=cuda_graph_mode(t.cuda_graph),
        test_episodes=cfg.eval.episodes,
        eval_batch=cfg.eval.meta_batch_size,
        eval_graph=bool(cfg.eval.get("cuda_graph", False)),
        ensemble=int(cfg.eval.get("ensemble", 1)),
        test_weights=str(cfg.eval.get("weights", "best")),
        train=train_shape,
        eval=eval_shape,
        logger=cfg.get("logger"),
        resume=bool(cfg.get("resume")),
        dry_run=bool(cfg.get("dry_run")),
    )
    record = {
        "algo": cfg.algo.name,
        "dataset": cfg.dataset.name,
        "dataset_split": cfg.dataset.get("split"),
        "backbone": cfg.backbone.name,
        "schedule": cfg.schedule.name,
        "optim": cfg.optim.name,
        "data_root": cfg.get("data_root"),
        "image_size": cfg.dataset.get("image_size"),
        "channels_last": nhwc,
        "keep_freed_memory": kept,
        "paper": OmegaConf.to_container(cfg.paper, resolve=True) if "paper" in cfg else None,
    }
    return Run(
        device=device,
        dataset=dataset,
        algo=algo.to(device, memory_format=memory_format),
        settings=settings,
        optimizer=functools.partial(make_optimizer, _plain_dict(cfg.optim)),
        scheduler=functools.partial(make_scheduler, _plain_dict(cfg.schedule)),
        config=OmegaConf.to_container(cfg, resolve=True),
        config_source=OmegaConf.to_container(cfg, resolve=False),
        record=record,
    )


def warn_if_graph_too_big(run: Run) -> None:
    """A one-line warning when an algorithm's estimated training graph (MAML's second order grows with
    inner_steps) exceeds the device's free memory, before the run spends minutes finding out."""
    estimate = getattr(run.algo, "graph_bytes", None)
    if estimate is None:
        return
    ways, shots, queries = run.settings.train
    image = (run.dataset.channels, run.dataset.image_size, run.dataset.image_size)
    try:
        need = estimate(image, ways * shots, ways * queries, run.settings.meta_batch_size, run.device)
        have = available_memory(run.device)
    except Exception:  # an estimate must never stop a run
        return
    if need > have:
        fewer = "algo.chunk_size to fewer tasks" if hasattr(run.algo, "chunk_size") else "trainer.meta_batch_size lower"
        print(
            f"fewshot: warning: {run.record['algo']}'s training graph needs about {need / 2**30:.1f} GiB "
            f"(algo.inner_steps={run.algo.inner_steps}), more than the {have / 2**30:.1f} GiB free on {run.device}; "
            f"set {fewer} or algo.first_order=true",
            file=sys.stderr,
        )


def episode_shape(cfg: DictConfig, split: str) -> tuple[int, int, int]:
    """(ways, shots, queries) of a split's tasks: validation and test may set their own ways and queries."""
    if split == "train":
        return cfg.episode.ways, cfg.episode.shots, cfg.episode.queries
    return cfg.eval.ways or cfg.episode.ways, cfg.episode.shots, cfg.eval.queries or cfg.episode.queries


def make_sampler(run: Run, split: str, seed: Optional[int] = None) -> EpisodeSampler:
    """The split's task sampler, on the run's device; seed: the split's own stream for the run's seed."""
    shape = run.settings.train if split == "train" else run.settings.eval
    seed = episode_seed(run.settings.seed, split) if seed is None else seed
    return run.dataset.sampler(split, *shape, device=run.device, seed=seed)


@dataclass(frozen=True)
class EvalRequest:
    """What fewshot-eval was asked: which checkpoint, on which split or benchmark."""

    checkpoint: str
    split: str = "test"
    benchmark: Optional[str] = None


# The setting (and attribute) of an algorithm's test-time inner steps, which fewshot-eval's eval.inner_steps sets:
# MAML's and its kin's eval_inner_steps, the Meta-LSTM's eval_updates. MAML++ has none: it tests with its training
# steps, which its per-step learning rates and BatchNorm weights are sized for.
TEST_STEP_KEYS = ("eval_inner_steps", "eval_updates")


def build_from_checkpoint(cfg: DictConfig) -> tuple[Run, dict, EvalRequest]:
    """fewshot-eval's build step: the run a checkpoint was trained as, from its own saved config, with what
    belongs to this machine (data, cache, device) and the test-only overrides (seed, episodes, inner steps, ...) from
    `cfg`."""
    from fewshot.checkpoint import CheckpointError, load_run_checkpoint
    from fewshot.config import TrainConfig
    from fewshot.engine.checkpoints import upgrade_config

    if cfg.split not in SPLIT_OFFSET:
        raise ConfigError(f"split={cfg.split!r}: choose one of {', '.join(SPLIT_OFFSET)}")
    if cfg.seed is not None:
        check_seed(cfg.seed)
    state = load_run_checkpoint(cfg.checkpoint)
    for key in ("algo", "backbone"):
        want = cfg[key].name if cfg.get(key) is not None else None
        if want is not None and want != state.get(key):
            raise CheckpointError(
                f"{cfg.checkpoint} holds a {key}={state.get(key)} model, not {key}={want}; "
                f"pass a {want} checkpoint or drop the {key}= override"
            )
    run_cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), upgrade_config(state["config_source"]))
    # Where data lives and which device runs it belong to this machine, not the training one.
    run_cfg.data_root, run_cfg.cache_dir, run_cfg.device = cfg.data_root, cfg.cache_dir, cfg.device
    if cfg.seed is not None:
        run_cfg.seed = cfg.seed
    if cfg.eval.episodes is not None:
        run_cfg.eval.episodes = cfg.eval.episodes
    if cfg.eval.meta_batch_size is not None:
        run_cfg.eval.meta_batch_size = cfg.eval.meta_batch_size
    if cfg.eval.get("cuda_graph") is not None:
        run_cfg.eval.cuda_graph = cfg.eval.cuda_graph
    if cfg.eval.get("compile_step") is not None:  # e.g. a compiled run's checkpoint, read where nothing compiles
        if "compile_step" not in run_cfg.algo:
            raise ConfigError(
                f"eval.compile_step: {cfg.checkpoint} holds an algo={state.get('algo')} model, which has no "
                "compiled step (only MANN's); drop eval.compile_step"
            )
        run_cfg.algo.compile_step = cfg.eval.compile_step
    steps = cfg.eval.get("inner_steps")
    if steps is not None:
        key = next((k for k in TEST_STEP_KEYS if k in run_cfg.algo), None)
        if key is None:
            algo = state.get("algo")
            why = " (it adapts with its training steps, which its per-step learning rates are sized for)"
            raise ConfigError(
                f"eval.inner_steps: {cfg.checkpoint} holds an algo={algo} model, whose test has no inner steps of its "
                f"own to set{why if algo == 'maml_pp' else ''}; drop eval.inner_steps"
            )
        if steps < 1:
            raise ConfigError(f"eval.inner_steps={steps}: must be >= 1, as algo.{key} in training")
        run_cfg.algo[key] = steps
    request = EvalRequest(checkpoint=str(cfg.checkpoint), split=cfg.split, benchmark=cfg.get("benchmark"))
    return build(run_cfg), state, request
