"""Checkpoints for resuming: what they hold, which one to resume from, and which settings may change."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import torch

from fewshot.atomic import atomic_write_text
from fewshot.checkpoint import (
    CheckpointError,
    load_run_checkpoint,
    rng_state,
    save_checkpoint,
)
from fewshot.data.sampler import EpisodeSampler
from fewshot.engine.builder import Run
from fewshot.flat import flatten, under


def checkpoint_state(
    run: Run,
    optimizer,
    iteration: int,
    best: dict,
    sampler: EpisodeSampler,
    progress: Optional[dict] = None,
    scheduler=None,
) -> dict:
    """Everything needed to continue bit for bit: weights, optimizer, iteration, best metric, every RNG
    state, the sampler's generator, the partial logging window, and the config that built the run."""
    return {
        "algo": run.record["algo"],
        "backbone": run.record["backbone"],
        "dataset": run.record["dataset"],
        "model": run.algo.state_dict(),
        "optimizer": optimizer_state(optimizer),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "iteration": iteration,
        "best": dict(best),
        "progress": dict(progress or {}),
        "rng": rng_state(),
        "sampler": sampler.state_dict(),
        "config": run.config,
        "config_source": run.config_source,
    }


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() in its portable form, as a snapshot: a CUDA-graph step's capturable Adam keeps its
    step counters on the GPU, which a plain (eager or CPU) optimizer refuses; the plain form holds them on the CPU,
    as Adam itself does, and fewshot.engine.steps.GraphStep moves them back."""
    state = optimizer.state_dict()
    # A snapshot: state_dict() shares the live tensors, which a CUDA graph's next replay updates in place.
    state["state"] = {
        k: {n: t.clone() if torch.is_tensor(t) else t for n, t in v.items()} for k, v in state["state"].items()
    }
    for group in state["param_groups"]:
        if group.get("capturable"):
            group["capturable"] = False
    for entry in state["state"].values():
        if torch.is_tensor(entry.get("step")):
            entry["step"] = entry["step"].to("cpu", torch.float32)
    return state


def find_resume_checkpoint(ckpt_dir: Path) -> Optional[dict]:
    """The newest readable of last.pt and previous.pt, or None when the folder holds neither."""
    errors = []
    for name in ("last.pt", "previous.pt"):
        path = ckpt_dir / name
        if path.exists():
            try:
                return load_run_checkpoint(path)
            except CheckpointError as e:
                errors.append(str(e))
                print(f"fewshot: warning: {e}; trying an older checkpoint", file=sys.stderr)
    if errors:
        raise CheckpointError(f"no readable checkpoint to resume from in {ckpt_dir}: {'; '.join(errors)}")
    return None


def save_last(ckpt_dir: Path, state: dict) -> None:
    """last.pt, keeping the one before it as previous.pt in case last.pt is damaged later."""
    last = ckpt_dir / "last.pt"
    if last.exists():
        os.replace(last, ckpt_dir / "previous.pt")
    save_checkpoint(last, state)


# Settings that may change between a run and its resumption: where things live, how it is
# evaluated, and how long it trains (training longer continues the same trajectory).
# Validation tasks (eval.ways, eval.queries, trainer.val_episodes) may not change: they would put numbers of
# another meaning in one metrics.csv column and pick best.pt across them. Test-only settings may.
# CELL_CHANGES make the run another cell: ProtoNets' 5-way and 20-way presets train alike (the same final weights,
# seed for seed, on a deterministic device), so one finished run, copied, gives both cells, as Snell et al.'s code
# tests one model. Only where the test reads the final weights: best.pt was picked by the other cell's validation.
CELL_CHANGES = ("eval.ways", "eval.queries", "name")
# Changes a finished run may take when it is run again to re-test it: they change validation too, so not mid-run.
TEST_ONLY_CHANGES = ("algo.eval_inner_steps", "algo.test_bn", *CELL_CHANGES)
RESUMABLE_CHANGES = (
    "resume",
    "device.",
    "data_root",
    "cache_dir",
    "dataset.root",
    "dataset.cache_dir",
    "dataset.split_dir",
    "trainer.iterations",
    "trainer.cuda_graph",  # the same step, replayed as a graph or not
    "algo.compile_step",  # MANN's same step, compiled or not
    "trainer.log_every",
    "trainer.val_every",
    "trainer.checkpoint_every",
    "eval.episodes",
    "eval.meta_batch_size",
    "eval.cuda_graph",
    "eval.weights",
    "logger",
    "dry_run",
    "paper.",  # the published number a preset quotes: a label, not a setting
    "revisions",  # what a preset used to set, for RESULTS.md: a label as well
)


def upgrade_config(config: dict) -> dict:
    """A checkpoint's saved config, completed with what its settings meant before a key existed, so an old
    checkpoint rebuilds the model it was trained as (and resuming it with today's defaults is refused)."""
    config = dict(config)
    config.setdefault("schedule", {"_target_": None, "name": "constant"})  # before schedules: constant lr
    if "optim" not in config:  # before optim/: Adam at trainer.meta_lr, torch's defaults otherwise
        lr = config.get("trainer", {}).get("meta_lr", 1e-3)
        config["optim"] = {"_target_": "torch.optim.adam.Adam", "_partial_": True, "name": "adam", "lr": lr}
    algo = config.get("algo")
    if isinstance(algo, dict) and algo.get("name") in ("matching", "matching_fce") and "similarity" not in algo:
        # Before algo.similarity, Matching Networks used the plain cosine, unscaled.
        config["algo"] = {**algo, "similarity": "cosine", "scale": 1.0, "learn_scale": False}
    if isinstance(algo, dict) and algo.get("name") == "meta_lstm" and "test_bn" not in algo:
        # Before algo.test_bn, the Meta-Learner LSTM normalised its test queries as one batch.
        config["algo"] = {**algo, "test_bn": "batch"}
    return _with_defaults(config)


def _with_defaults(config: dict) -> dict:
    """Keys a checkpoint lacks because fewshot (or torch, for the optimizer) added them after it was written take
    today's defaults: a new setting's default keeps the old behaviour (one that does not, like Matching Networks'
    similarity above, is upgraded explicitly). Without this, a run could not be resumed after an upgrade."""
    from hydra.utils import get_object
    from omegaconf import OmegaConf

    from fewshot.config import TrainConfig
    from fewshot.schemas import schema_for

    def known(node: dict) -> dict:  # the schema's values, without the ones it leaves unset (???)
        return {k: v for k, v in node.items() if v != "???"}

    top = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    for key, default in known(top).items():
        mine = config.get(key)
        config[key] = (
            {**default, **mine} if isinstance(default, dict) and isinstance(mine, dict) else config.get(key, default)
        )
    for kind in ("algo", "backbone", "dataset", "optim", "schedule"):
        node = config.get(kind)
        if not (isinstance(node, dict) and isinstance(node.get("_target_"), str)):
            continue
        try:
            target = get_object(node["_target_"])
        except Exception:  # a class that no longer exists: nothing to complete; the comparison names the key
            continue
        schema = OmegaConf.to_container(OmegaConf.structured(schema_for(target, str(node.get("name")), kind)))
        config[kind] = {**known(schema), **node}
    return config


def check_same_run(state: dict, config: dict, path: Path) -> list[str]:
    """Refuse to resume a run folder with other settings than the ones requested (`config`, resolved): continuing
    another experiment's weights would silently mix two runs. Returns the test-only changes a finished run takes
    ("key: old -> new"), for its results.json."""
    old = flatten(upgrade_config(state["config"]))
    new = flatten(config)
    finished = state["iteration"] >= config["trainer"]["iterations"]  # it will only test
    free = RESUMABLE_CHANGES + (TEST_ONLY_CHANGES if finished else ())
    differ = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    changed = [k for k in differ if not under(k, free)]
    if changed:
        diffs = ", ".join(f"{k}: {old.get(k)} -> {new.get(k)}" for k in changed[:4]) + (
            " ..." if len(changed) > 4 else ""
        )
        was, now = old.get("trainer.iterations"), new.get("trainer.iterations")
        if was != now and all(under(k, ("schedule.",)) for k in changed):  # cosine's T_max, linear's total_iters
            raise CheckpointError(
                f"{path} holds a run whose learning-rate schedule spans its {was} iterations ({diffs}), so it "
                f"cannot be trained to {now}: use a new run folder (the default)"
            )
        raise CheckpointError(
            f"{path} holds a run with other settings ({diffs}); use a new run folder "
            "(the default) or the run's own settings to resume it"
        )
    iterations = config["trainer"]["iterations"]
    if state["iteration"] > iterations:
        raise CheckpointError(
            f"{path} is already at iteration {state['iteration']}, past trainer.iterations={iterations}"
        )
    retest = [k for k in differ if under(k, TEST_ONLY_CHANGES)]
    if any(under(k, CELL_CHANGES) for k in retest) and (
        config["eval"]["weights"] != "last" or config["eval"]["ensemble"] > 1
    ):
        raise CheckpointError(
            f"{path}: testing a finished run as another cell ({', '.join(retest)}) needs eval.weights=last: its "
            "best.pt was picked by the validation it trained with"
        )
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in retest]


def truncate_metrics(path: Path, iteration: int) -> None:
    """Drop metrics.csv rows written after the checkpoint we resume from (and any half-written line)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = lines[:1] + [
        ln
        for ln in lines[1:]
        if ln.split(",")[0].isdigit()
        and int(ln.split(",")[0]) <= iteration
        and len(ln.split(",")) == len(lines[0].split(","))
    ]
    atomic_write_text(path, "\n".join(kept) + "\n")
