"""fewshot-eval: rebuild a run from its checkpoint and test it (or run a benchmark on it).

    fewshot-eval checkpoint=outputs/<run>/checkpoints/best.pt [split=val] [benchmark=lake_runs] [eval.inner_steps=N]

`run(cfg, out_dir)` is the story: own the output folder, rebuild the run from the checkpoint's own config, test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fewshot import cli
from fewshot.engine.builder import build_from_checkpoint
from fewshot.engine.evaluation import test_checkpoint
from fewshot.runlock import hold_run_folder
from fewshot.train import write_hydra_files

PROG = "fewshot-eval"


def run(cfg: DictConfig, out_dir: Path | str) -> dict[str, Any]:
    """Test the checkpoint `cfg.checkpoint`; returns results.json's content. With the training run's seed and
    episodes it reproduces the training run's test number exactly."""
    out_dir = Path(out_dir)
    with hold_run_folder(out_dir, PROG):  # two evaluations into one folder would overwrite each other
        write_hydra_files(out_dir, cfg)
        built, state, request = build_from_checkpoint(cfg)
        return test_checkpoint(built, state, request, out_dir)


@hydra.main(version_base="1.3", config_path=cli.CONFIG_PATH, config_name="eval")
def _job(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except cli.HANDLED as e:
        cli.report(PROG, e)


def main() -> None:
    """The fewshot-eval command."""
    cli.main(PROG, "eval", _job)


if __name__ == "__main__":  # python -m fewshot.eval ...
    main()
