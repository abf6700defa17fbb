"""results.json files found under run and sweep folders, read and checked: the input of fewshot-table and the
ledger. A corrupt or incomplete file is reported and skipped, never pooled."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Union

from fewshot.errors import FewshotError
from fewshot.metrics import METRICS


class TableError(FewshotError):
    """A path given to fewshot-table does not exist or holds no usable results.json."""


def _warn_stderr(message: str) -> None:
    import sys

    print(f"fewshot-table: warning: {message}", file=sys.stderr)


def _find_results(path: Path) -> list[Path]:
    """results.json files under `path` at any depth (a file is taken as it is); sorted, so output is stable."""
    if path.is_file():
        return [path]
    found = []
    # os.walk without followlinks: a symlink loop in an outputs/ tree cannot hang the command.
    for folder, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if d not in ("checkpoints", ".hydra")]  # never hold results; can be large
        if "results.json" in files:
            found.append(Path(folder) / "results.json")
    return sorted(found)


def metric_of(result: dict) -> str:
    """A results.json's test metric (fewshot.metrics): results.json before metrics were named held accuracy."""
    return result["test"].get("metric", "acc")


def _check_results(data: Any) -> None:
    """Raise ValueError naming the first thing a results.json lacks for the table."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    for key in ("name", "algo", "dataset", "backbone"):
        if not isinstance(data.get(key), str):
            raise ValueError(f'"{key}" is missing or not a string')
    for key in ("ways", "shots", "queries", "seed"):
        if not isinstance(data.get(key), int) or isinstance(data.get(key), bool):
            raise ValueError(f'"{key}" is missing or not an integer')
    test = data.get("test")
    if not isinstance(test, dict):
        raise ValueError('"test" is missing or not an object')
    metric = metric_of(data)
    if metric not in METRICS:
        raise ValueError(f'"test.metric" is {metric!r}; fewshot knows {", ".join(METRICS)}')
    for key in (f"{metric}_mean", f"{metric}_ci95"):
        v = test.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f'"test.{key}" is missing or not a finite number')
    if not isinstance(test.get("episodes"), int):
        raise ValueError('"test.episodes" is missing or not an integer')
    paper = data.get("paper")
    if paper is not None and not isinstance(paper, dict):
        raise ValueError('"paper" is not an object')


def collect(
    paths: Iterable[Union[str, Path]], include_eval: bool = False, warn: Callable[[str], None] = _warn_stderr
) -> list[dict]:
    """Read every results.json under `paths` (run folders, sweep folders, any depth, or results.json files).

    Returns the parsed dicts, each with an added "_path" (the file it came from). A corrupt or incomplete file is
    reported through `warn` and skipped. fewshot-eval results (a "checkpoint" key) are skipped unless
    `include_eval`. Raises TableError when a path does not exist, or when nothing usable is found under a path."""
    results: list[dict] = []
    seen: set[Path] = set()
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise TableError(f"{path} does not exist")
        files = _find_results(path)
        if not files:
            raise TableError(f"{path} holds no results.json (expected a run folder, a sweep folder or results.json)")
        usable, skipped_eval = 0, 0
        for file in files:
            key = file.resolve()
            if key in seen:  # the same run reached through two of the given paths
                usable += 1
                continue
            seen.add(key)
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                _check_results(data)
            except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
                warn(f"skipping {file}: {e}")
                continue
            if "checkpoint" in data and not include_eval:
                skipped_eval += 1
                continue
            results.append({**data, "_path": str(file)})
            usable += 1
        if not usable:
            hint = f" ({skipped_eval} fewshot-eval results skipped; pass --include-eval)" if skipped_eval else ""
            raise TableError(f"{path} holds no usable training results.json{hint}")
    return results
