"""fewshot-train: compose -> build -> meta-train -> test -> write.

    fewshot-train algo=maml dataset=omniglot            (or: python -m fewshot.train ...)

`main` is the Hydra entrypoint; `run(cfg, run_dir)` is the whole story for one composed config, readable top to
bottom: own the run folder, build the run, meta-train it (resuming if the folder holds a checkpoint), test the
best checkpoint and write results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fewshot import cli
from fewshot.atomic import atomic_write_text, remove_stale_temporaries
from fewshot.engine.builder import build, seed_everything
from fewshot.engine.loop import meta_train
from fewshot.engine.signals import leave_signals_ignored_after_interrupt, stop_on_signals
from fewshot.runlock import hold_run_folder

PROG = "fewshot-train"


def run(cfg: DictConfig, run_dir: Path | str) -> dict[str, Any]:
    """Meta-train, validate and checkpoint, then test the best checkpoint; returns results.json's content
    ({} for dry_run=true). The run owns its folder throughout: a second run on it stops with one line."""
    run_dir = Path(run_dir)
    with hold_run_folder(run_dir, PROG):  # creates the folder
        # Locked: no other live run writes here, so our files' temporaries are a killed writer's leftovers.
        remove_stale_temporaries(run_dir / "checkpoints")
        remove_stale_temporaries(run_dir, "metrics.csv", "results.json", "results.md")
        write_hydra_files(run_dir, cfg)
        with stop_on_signals() as signals:
            signals.immediate = "while preparing the run: nothing was trained yet; run the same command again"
            seed_everything(cfg.seed)  # before the build: the weights' initialisation draws from it
            built = build(cfg)
            print(
                f"fewshot: {built.settings.name} on {built.device}, "
                f"{sum(p.numel() for p in built.algo.parameters()):,} parameters, run folder {run_dir}"
            )
            if built.settings.dry_run:
                print(OmegaConf.to_yaml(cfg))
                return {}
            return meta_train(built, run_dir, signals)


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


def objective(results: dict) -> Optional[float]:
    """What a sweeper (Optuna) maximises: the best validation score, never the test set."""
    return results["best_val"]["val_score"] if results else None


@hydra.main(version_base="1.3", config_path=cli.CONFIG_PATH, config_name="train")
def _job(cfg: DictConfig) -> Optional[float]:
    leave_signals_ignored_after_interrupt()  # this process (the command's, or a sweep worker's) exits after one
    try:
        return objective(run(cfg, HydraConfig.get().runtime.output_dir))
    except cli.HANDLED as e:
        cli.report(PROG, e)
        return None  # a failed job of a sweep: the sweep goes on


def main() -> None:
    """The fewshot-train command."""
    cli.main(PROG, "train", _job)


if __name__ == "__main__":  # python -m fewshot.train ...
    main()
