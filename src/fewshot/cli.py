"""Console entrypoints: thin Hydra wrappers around engine.train and engine.evaluate."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from omegaconf import DictConfig

from fewshot.config import register_configs
from fewshot.errors import FewshotError

register_configs()
CONFIG_PATH = "pkg://fewshot.conf"


def _report(prog: str, error: BaseException) -> None:
    """One line on stderr and a non-zero exit (2, or 128+signal after a preemption); the traceback
    only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    if isinstance(error, InstantiationException) and isinstance(error.__cause__, FewshotError):
        error = error.__cause__  # our own message, without Hydra's "Error in call to target ..." wrapper
    print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr)
    sys.exit(getattr(error, "exit_code", 2))


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _train(cfg: DictConfig) -> Optional[float]:
    from fewshot import engine

    try:
        results = engine.train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (FewshotError, InstantiationException) as e:
        _report("fewshot-train", e)
    # The objective a sweeper (Optuna) maximizes: validation accuracy, never the test set.
    return results["best_val"]["val_score"] if results else None


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _eval(cfg: DictConfig) -> None:
    from fewshot import engine

    try:
        engine.evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (FewshotError, InstantiationException) as e:
        _report("fewshot-eval", e)


def one_line(message: str) -> str:
    """Hydra's multi-line composition errors as one line: what is wrong and the available choices."""
    noise = ("full_key:", "reference_type", "object_type", "To append to your config", "Set the environment variable")
    lines = []
    for line in str(message).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith(noise):
            lines.append(line)
    text = " ".join(lines).replace(": ", ": ", 1)
    return text.replace("Available options in", "; available options in").replace(" ;", ";")


def _precheck(prog: str, config_name: str) -> None:
    """Compose once before Hydra's own run so that a bad override is reported as one line.

    Skipped for multirun sweeps (their comma lists are expanded by the sweeper) and Hydra's info flags."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args, _ = get_args_parser().parse_known_args()
    if args.multirun or args.help or args.hydra_help or args.cfg or args.info or args.shell_completion:
        return
    try:
        with initialize_config_module(config_module="fewshot.conf", version_base="1.3"):
            compose(config_name, overrides=args.overrides)
    except (HydraException, OmegaConfBaseException) as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            return  # let Hydra report it in full
        cause = f"\n{e.__cause__}" if e.__cause__ is not None and str(e.__cause__) not in str(e) else ""
        print(f"{prog}: error: {one_line(str(e) + cause)}", file=sys.stderr)
        sys.exit(2)
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


def train_main() -> None:
    _precheck("fewshot-train", "train")
    _train()


def eval_main() -> None:
    _precheck("fewshot-eval", "eval")
    _eval()


def table_main() -> None:
    from fewshot.table import main

    sys.exit(main())


if __name__ == "__main__":  # `python -m fewshot.cli train|eval|table ...` where the console scripts are not installed
    command = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    mains = {"train": train_main, "eval": eval_main, "table": table_main}
    if command not in mains:
        sys.exit("usage: python -m fewshot.cli {train,eval,table} [overrides...]")
    sys.argv[0] = f"fewshot-{command}"
    mains[command]()
