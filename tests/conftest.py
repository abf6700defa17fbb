"""Shared fixtures and helpers: Hydra composition of the packaged config tree, real-data locations, scripts as modules,
a CUDA generator's state, real learning against the untrained model, a straight run against a stopped-and-resumed
one."""

from __future__ import annotations

import importlib.util
import os
import signal
import threading
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from fewshot.config import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"

register_configs()


def _share_the_cores_among_workers() -> None:
    """Under pytest-xdist (`make test` runs one worker per core) each worker, and every CLI it starts, gets its
    share of the cores: at torch's default of one thread per core, two workers on two cores would each spin up two
    OpenMP threads and contend."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)


_share_the_cores_among_workers()


@pytest.fixture(autouse=True)
def _signal_handlers():
    """Each test gets the worker's SIGINT and SIGTERM handlers back, so none starts with another's (an interrupted
    run leaves them ignored once the train job has said its process exits next: fewshot.engine.signals)."""
    from fewshot.engine import signals

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    choice = signals._ignore_after_interrupt  # the train job's process-wide choice (fewshot.train._job)
    yield
    for s, h in saved.items():
        signal.signal(s, h)
    signals._ignore_after_interrupt = choice


@pytest.fixture
def compose_cfg(tmp_path):
    """compose_cfg(config_name, overrides) -> DictConfig, composed exactly as the entrypoints do."""

    def _compose(config_name: str = "train", overrides: list[str] | None = None, return_hydra_config: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="fewshot.conf", version_base="1.3"):
            return compose(config_name, overrides=list(overrides or []), return_hydra_config=return_hydra_config)

    yield _compose
    GlobalHydra.instance().clear()


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def cuda_generator_state(seed: int, offset: int = 0) -> torch.Tensor:
    """What torch.Generator("cuda").get_state() returns: its Philox seed and offset, 16 bytes."""
    return torch.tensor(list(seed.to_bytes(8, "little") + offset.to_bytes(8, "little")), dtype=torch.uint8)


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_learns(cfg, run_dir: Path, label: str, floor: float, gain: float, batch: int = 25):
    """Trains cfg in run_dir and asserts its test accuracy above `floor` and above the untrained model's by `gain`,
    the untrained model scored on the same test tasks (random conv features already classify some Omniglot
    characters: that is the baseline a short real-learning run must clearly beat). Returns (the untrained run,
    its accuracy, the trained run's test results)."""
    from fewshot import engine
    from fewshot.train import run as train_run

    engine.seed_everything(cfg.seed)
    untrained = engine.build(cfg)
    sampler = engine.make_sampler(untrained, "test")
    seed = engine.episode_seed(cfg.seed, "test")
    before = engine.evaluate(untrained.algo, sampler, cfg.eval.episodes, batch, seed)["acc_mean"]
    after = train_run(cfg, run_dir)["test"]
    print(f"{label}: untrained {before:.3f} -> trained {after['acc_mean']:.3f} ± {after['acc_ci95']:.3f}")
    assert after["acc_mean"] > floor, after
    assert after["acc_mean"] > before + gain, (before, after)
    return untrained, before, after


def straight_and_resumed(compose_cfg, tmp_path: Path, overrides: list[str], stop_at: int = 3):
    """Trains `overrides` straight through in tmp_path/straight, and in tmp_path/split stopped at iteration stop_at
    then resumed with the same command; asserts the two last.pt hold bit-identical weights at the same iteration.
    Returns (straight results, resumed results, straight last.pt, resumed last.pt)."""
    from fewshot.checkpoint import load_checkpoint
    from fewshot.train import run as train_run

    straight = train_run(compose_cfg("train", overrides), tmp_path / "straight")
    train_run(compose_cfg("train", [*overrides, f"trainer.iterations={stop_at}"]), tmp_path / "split")
    resumed = train_run(compose_cfg("train", overrides), tmp_path / "split")
    a, b = (load_checkpoint(tmp_path / d / "checkpoints" / "last.pt") for d in ("straight", "split"))
    assert a["iteration"] == b["iteration"] > stop_at
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    return straight, resumed, a, b


from conftest_data import omniglot_28, omniglot_cache_dir, omniglot_root  # noqa: E402,F401  (real-data fixtures)
