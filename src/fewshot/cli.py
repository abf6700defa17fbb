"""Console entrypoints: thin Hydra wrappers around engine.train and engine.evaluate."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fewshot.config import register_configs
from fewshot.errors import FewshotError

register_configs()
CONFIG_PATH = "pkg://fewshot.conf"


def _report(prog: str, error: BaseException) -> None:
    """One line on stderr and exit status 2; the traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"{prog}: error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> None:
    from fewshot import engine

    try:
        engine.train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FewshotError as e:
        _report("fewshot-train", e)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from fewshot import engine

    try:
        engine.evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))
    except FewshotError as e:
        _report("fewshot-eval", e)


def train_main() -> None:
    _train()


def eval_main() -> None:
    _eval()


def table_main() -> None:
    print("fewshot-table: not implemented yet (it arrives with the paper-tables issue)", file=sys.stderr)
    sys.exit(2)
