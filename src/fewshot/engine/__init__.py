"""The engine under fewshot-train and fewshot-eval (fewshot.train, fewshot.eval), one module per job:

    builder      a composed config -> Run (device, task source, algorithm, optimizer, typed Settings); the only
                 place below the entrypoints that reads a config
    loop         meta-training: sample, step, validate, checkpoint, then test the best checkpoint
    evaluation   fixed task sets: validation, the test, fewshot-eval, Lake's runs
    checkpoints  what a checkpoint holds, which one to resume from, which settings may change
    signals      SIGTERM/SIGINT: stop at a clean point and say how to resume
    results      results.json/md, metrics.csv, TensorBoard, the learning curve

Nothing here knows which algorithm runs: every algorithm answers algo(episode, train) -> AlgoOutput.
"""

from fewshot.engine.builder import (
    MAX_SEED,
    REGRESSION_DATASETS,
    SPLIT_OFFSET,
    EvalRequest,
    Run,
    Settings,
    Shape,
    _plain,
    build,
    build_from_checkpoint,
    check_compatible,
    check_config,
    check_seed,
    episode_seed,
    episode_shape,
    make_sampler,
    seed_everything,
    warn_if_graph_too_big,
)
from fewshot.engine.checkpoints import (
    RESUMABLE_CHANGES,
    check_same_run,
    checkpoint_state,
    find_resume_checkpoint,
    save_last,
    truncate_metrics,
    upgrade_config,
)
from fewshot.engine.evaluation import evaluate, lake_benchmark, test_checkpoint
from fewshot.engine.loop import DIVERGED, meta_train
from fewshot.engine.results import make_results, results_markdown, run_command, write_results
from fewshot.engine.signals import Interrupted, SignalGuard, stop_on_signals
from fewshot.errors import ConfigError, FewshotError

__all__ = [
    "DIVERGED",
    "MAX_SEED",
    "REGRESSION_DATASETS",
    "RESUMABLE_CHANGES",
    "SPLIT_OFFSET",
    "ConfigError",
    "EvalRequest",
    "FewshotError",
    "Interrupted",
    "Run",
    "Settings",
    "Shape",
    "SignalGuard",
    "_plain",
    "build",
    "build_from_checkpoint",
    "check_compatible",
    "check_config",
    "check_same_run",
    "check_seed",
    "checkpoint_state",
    "episode_seed",
    "episode_shape",
    "evaluate",
    "find_resume_checkpoint",
    "lake_benchmark",
    "make_results",
    "make_sampler",
    "meta_train",
    "results_markdown",
    "run_command",
    "save_last",
    "seed_everything",
    "stop_on_signals",
    "test_checkpoint",
    "truncate_metrics",
    "upgrade_config",
    "warn_if_graph_too_big",
    "write_results",
]
