"""The train and evaluate story: compose -> build -> meta-train -> checkpoint -> test -> results.

Nothing here knows which algorithm runs: every algorithm answers algo(episode, train) -> AlgoOutput.
One module per job: builder (config -> run), loop (meta-training), evaluation (validation, test, fewshot-eval),
checkpoints (resume), signals (preemption), results (what a run writes).
"""

from fewshot.engine.builder import (
                                  MAX_SEED,
                                  REGRESSION_DATASETS,
                                  SPLIT_OFFSET,
                                  Run,
                                  _plain,
                                  build,
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
from fewshot.engine.evaluation import (
                                  evaluate,
                                  evaluate_benchmark,
                                  evaluate_checkpoint,
                                  validation_score,
)
from fewshot.engine.loop import DIVERGED, train
from fewshot.engine.results import (
                                  make_results,
                                  results_markdown,
                                  run_command,
                                  write_hydra_files,
                                  write_results,
)
from fewshot.engine.signals import Interrupted, SignalGuard, stop_on_signals
from fewshot.errors import ConfigError, FewshotError

__all__ = [
    "DIVERGED", "MAX_SEED", "REGRESSION_DATASETS", "RESUMABLE_CHANGES", "SPLIT_OFFSET", "ConfigError", "FewshotError",
    "Interrupted", "Run", "SignalGuard", "_plain", "build", "check_compatible", "check_config", "check_same_run",
    "check_seed", "checkpoint_state", "episode_seed", "episode_shape", "evaluate", "evaluate_benchmark",
    "evaluate_checkpoint", "find_resume_checkpoint", "make_results", "make_sampler", "results_markdown",
    "run_command", "save_last", "seed_everything", "stop_on_signals", "train", "truncate_metrics", "upgrade_config",
    "validation_score", "warn_if_graph_too_big", "write_hydra_files", "write_results",
]
