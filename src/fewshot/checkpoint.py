"""Self-describing checkpoints, written atomically and loaded without executing code."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from fewshot.atomic import atomic_write
from fewshot.errors import CHECKPOINT_HINT, FewshotError

FORMAT = "fewshot-checkpoint-v1"
# What every reader of a checkpoint relies on (fewshot-eval, resume); "scheduler" came later and may be absent.
REQUIRED_KEYS = (
    "algo",
    "backbone",
    "dataset",
    "model",
    "optimizer",
    "iteration",
    "best",
    "progress",
    "rng",
    "sampler",
    "config",
    "config_source",
)


class CheckpointError(FewshotError):
    """A checkpoint is missing, truncated, corrupt or does not fit the requested run."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save({"format": FORMAT, **state}, f))


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never arbitrary pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass checkpoint={CHECKPOINT_HINT}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, or a disallowed global
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable or not a plain fewshot checkpoint ({first})") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a {FORMAT} file")
    return state


def load_run_checkpoint(path: Path | str) -> dict[str, Any]:
    """A checkpoint of a training run (best.pt, last.pt), refused in one line when keys that resume and
    fewshot-eval read are missing."""
    state = load_checkpoint(path)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}; "
            "use a best.pt or last.pt written by fewshot-train"
        )
    return state


def rng_state() -> dict[str, Any]:
    """Every global RNG, in types that weights-only loading accepts."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Added to an evaluation's seed for the algorithm's own draws: the sampler draws the tasks from `seed` itself, and
# two generators seeded alike would give the same numbers to both (task choice and mini-batch order correlated).
ALGORITHM_STREAM = 0x5EED0000


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's generators (the CPU's and `device`'s) seeded from `seed` inside and restored after. Evaluation runs
    in it: what an algorithm draws while it tests (Reptile's inner mini-batches) is then fixed by the seed, as the
    tasks are, so fewshot-eval repeats a run's test, and validating leaves training's random stream as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + ALGORITHM_STREAM)
        yield
