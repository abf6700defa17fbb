"""Lake et al. (2015)'s original Omniglot one-shot benchmark: the 20 runs of 20-way, 1-shot classification.

The file is ``all_runs.zip`` from brendenlake/omniglot (python/one-shot-classification/), read in place.
Its layout::

    runNN/training/class01.png .. class20.png   one drawing of each of the 20 classes (105x105 PNG)
    runNN/test/item01.png .. item20.png         one new drawing of each class, in a shuffled order
    runNN/class_labels.txt                      20 lines "runNN/test/itemKK.png runNN/training/classMM.png"

for runNN in run01..run20. The answer key names, for each test drawing, the training drawing of its class.
Images are decoded exactly as ``fewshot.data.omniglot`` decodes its training data (grayscale, Lanczos
resize to SxS, inverted so strokes are 255 on a 0 background), with that module's own functions.

Lake reports the error rate in percent per run and its mean over the 20 runs (each run has 20 trials,
so that mean is also the overall error over the 400 trials); ``lake_report`` does the same.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fewshot.data.base import DataError, Episode
from fewshot.data.io.archives import check_zip_members, open_zip
from fewshot.data.omniglot import DEFAULT_BASE_URL, decode_drawing

LAKE_ZIP_NAME = "all_runs.zip"
LAKE_URL = f"{DEFAULT_BASE_URL}/one-shot-classification/all_runs.zip"
NUM_RUNS = 20
NUM_TRIALS = 20  # test drawings per run
NUM_WAYS = 20  # training drawings (classes) per run
LABELS_FILE = "class_labels.txt"

_LABELS_RE = re.compile(r"^(?P<prefix>(?:.*/)?)(?P<run>run\d+)/" + re.escape(LABELS_FILE) + r"$")


@dataclass
class LakeRun:
    """One run of Lake's benchmark.

    support: (20, 1, S, S) uint8, the training drawings in sorted file order (class01..class20); strokes bright.
    query: (20, 1, S, S) uint8, the test drawings in sorted file order (item01..item20).
    query_labels: (20,) int64, index into support of each query's correct training drawing.
    support_files / query_files: the zip entry names of those images, in the same order.
    """

    name: str
    support: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    support_files: list[str]
    query_files: list[str]


def lake_zip_path(data_root: str | os.PathLike[str]) -> Path:
    """Where the benchmark zip belongs under a data root: <data_root>/omniglot/all_runs.zip."""
    return Path(data_root).expanduser() / "omniglot" / LAKE_ZIP_NAME


def _missing_message(path: Path) -> str:
    return (
        f"Lake's one-shot runs not found: {path} does not exist; put {LAKE_ZIP_NAME} there "
        f"or at <data_root>/omniglot/{LAKE_ZIP_NAME} (the original file is {LAKE_URL})"
    )


def _resolve(entry: str, prefix: str, run: str, files: set[str]) -> str | None:
    """An answer-key path as a zip entry: relative to the runs' parent folder (as in Lake's file) or to the run."""
    entry = entry.replace("\\", "/")
    if entry.startswith("./"):
        entry = entry[2:]
    for candidate in (prefix + entry, f"{prefix}{run}/{entry}"):
        if candidate in files:
            return candidate
    return None


def _plan_run(
    zip_path: Path, zf: zipfile.ZipFile, files: set[str], prefix: str, run: str
) -> tuple[list[str], list[str], list[int]]:
    """(sorted training entries, sorted test entries, answer index per test entry) for one run, checked."""
    where = f"{zip_path}: {run}"
    folder = f"{prefix}{run}/"
    support = sorted(f for f in files if f.startswith(folder + "training/") and f.lower().endswith(".png"))
    query = sorted(f for f in files if f.startswith(folder + "test/") and f.lower().endswith(".png"))
    if len(support) != NUM_WAYS or len(query) != NUM_TRIALS:
        raise DataError(
            f"{where} has {len(support)} training and {len(query)} test PNGs; expected "
            f"{NUM_WAYS} and {NUM_TRIALS}: replace the zip with the original {LAKE_ZIP_NAME}"
        )
    labels_entry = folder + LABELS_FILE
    try:
        text = zf.read(labels_entry).decode("utf-8")
    except (zipfile.BadZipFile, OSError, zlib.error, UnicodeDecodeError, KeyError) as e:
        raise DataError(
            f"cannot read {labels_entry} from {zip_path} ({e}); replace the zip with the original {LAKE_ZIP_NAME}"
        ) from e
    s_index = {f: i for i, f in enumerate(support)}
    q_index = {f: i for i, f in enumerate(query)}
    answers: list[int | None] = [None] * len(query)
    lines = [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) != NUM_TRIALS:
        raise DataError(
            f"{zip_path}: {labels_entry} has {len(lines)} answers; expected {NUM_TRIALS} (one per test image)"
        )
    for lineno, fields in lines:
        at = f"{zip_path}: {labels_entry}:{lineno}"
        if len(fields) != 2:
            raise DataError(f"{at}: {' '.join(fields)!r} is not 'test/itemKK.png training/classMM.png'")
        test_f = _resolve(fields[0], prefix, run, files)
        train_f = _resolve(fields[1], prefix, run, files)
        if test_f is None or test_f not in q_index:
            raise DataError(f"{at}: test image {fields[0]!r} is not one of the {run}/test/ PNGs in the zip")
        if train_f is None or train_f not in s_index:
            raise DataError(f"{at}: training image {fields[1]!r} is not one of the {run}/training/ PNGs in the zip")
        qi = q_index[test_f]
        if answers[qi] is not None:
            raise DataError(f"{at}: test image {fields[0]!r} is answered twice")
        answers[qi] = s_index[train_f]
    # 20 distinct test images answered out of 20 lines: every test image has exactly one answer.
    return support, query, [a for a in answers if a is not None]


def _decode(zip_path: Path, zf: zipfile.ZipFile, entries: Sequence[str], image_size: int) -> torch.Tensor:
    """Entries -> (n, 1, S, S) uint8, strokes 255 on 0, exactly as fewshot.data.omniglot decodes its drawings."""
    out = np.empty((len(entries), image_size, image_size), dtype=np.uint8)
    try:
        for i, entry in enumerate(entries):
            out[i] = decode_drawing(zf.read(entry), image_size)
    except (zipfile.BadZipFile, OSError, SyntaxError, ValueError, zlib.error) as e:  # corrupt entry or PNG
        raise DataError(
            f"cannot decode {entry} from {zip_path} ({e}); replace the zip with the original {LAKE_ZIP_NAME}"
        ) from e
    return torch.from_numpy(out).unsqueeze(1)


def load_lake_runs(zip_path: str | os.PathLike[str], image_size: int = 28) -> list[LakeRun]:
    """The 20 runs of Lake's one-shot benchmark from all_runs.zip, in run order, images S x S uint8.

    Raises DataError when the zip is missing (saying where it belongs), unreadable, has an unsafe entry name,
    or does not hold 20 runs of 20 training + 20 test PNGs with a complete answer key.
    """
    if image_size < 1:
        raise DataError(f"Lake runs image_size must be positive, got {image_size}")
    path = Path(zip_path).expanduser().absolute()
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass the zip itself, e.g. {path / LAKE_ZIP_NAME}")
    if not path.exists():
        raise DataError(_missing_message(path))
    with open_zip(path) as zf:
        try:
            names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as e:  # pragma: no cover - open_zip parsed the directory already
            raise DataError(f"{path} is not a readable zip ({e}); replace it with the original {LAKE_ZIP_NAME}") from e
        check_zip_members(path, names)
        files = {n for n in names if not n.endswith("/")}
        found: dict[str, str] = {}  # run name -> folder prefix
        for n in files:
            m = _LABELS_RE.match(n)
            if m is None:
                continue
            if m["run"] in found:
                raise DataError(
                    f"{path} holds {m['run']} twice (under {found[m['run']]!r} and "
                    f"{m['prefix']!r}); replace it with the original {LAKE_ZIP_NAME}"
                )
            found[m["run"]] = m["prefix"]
        if len(found) != NUM_RUNS:
            raise DataError(
                f"{path} holds {len(found)} runs (folders runNN/ with {LABELS_FILE}); expected "
                f"{NUM_RUNS}: is this Lake's {LAKE_ZIP_NAME}? The original is {LAKE_URL}"
            )
        runs = []
        for run in sorted(found, key=lambda r: (int(r[3:]), r)):
            support_f, query_f, answers = _plan_run(path, zf, files, found[run], run)
            runs.append(
                LakeRun(
                    name=run,
                    support=_decode(path, zf, support_f, image_size),
                    query=_decode(path, zf, query_f, image_size),
                    query_labels=torch.tensor(answers, dtype=torch.int64),
                    support_files=support_f,
                    query_files=query_f,
                )
            )
    return runs


def lake_episode(
    runs: Sequence[LakeRun],
    mean: Sequence[float] = (0.0,),
    std: Sequence[float] = (1.0,),
    device: torch.device | str = "cpu",
) -> Episode:
    """All runs as one Episode, one task per run (T = len(runs)), normalized like EpisodeSampler.

    support_x: (T, 20, C, S, S) float (x/255 - mean)/std     support_y: (T, 20) = arange(20) per task
    query_x:   (T, 20, C, S, S) float                        query_y:   (T, 20) = each run's query_labels
    """
    if not runs:
        raise DataError("lake_episode needs at least one run")
    shapes = {(tuple(r.support.shape), tuple(r.query.shape)) for r in runs}
    if len(shapes) != 1:
        raise DataError(f"Lake runs differ in shape ({sorted(shapes)}); load them all with the same image_size")
    device = torch.device(device)
    channels = runs[0].support.shape[1]
    if len(mean) not in (1, channels) or len(std) not in (1, channels):
        raise DataError(f"mean/std have {len(mean)}/{len(std)} values for {channels}-channel images")
    # Same fused (x/255 - mean)/std as EpisodeSampler, so numbers match the training pipeline bit for bit.
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(-1, 1, 1)
    scale, shift = 1.0 / (255.0 * std_t), -mean_t / std_t
    support = torch.stack([r.support for r in runs]).to(device)
    query = torch.stack([r.query for r in runs]).to(device)
    ways = support.shape[1]
    return Episode(
        support_x=torch.addcmul(shift, support, scale),
        support_y=torch.arange(ways, device=device).expand(len(runs), -1).contiguous(),
        query_x=torch.addcmul(shift, query, scale),
        query_y=torch.stack([r.query_labels for r in runs]).to(device),
    )


def lake_report(acc_per_run: Sequence[float], runs: Sequence[LakeRun] | Sequence[str]) -> dict:
    """Error rates as Lake reports them: percent per run (100 * (1 - accuracy)) and their mean over runs.

    acc_per_run: accuracy of each run as a fraction in [0, 1], in the order of runs (LakeRuns or run names).
    Returns {"runs": [{"run", "accuracy", "error"}...], "error_per_run": {name: error %}, "mean_error": %,
    "mean_accuracy": fraction, "markdown": a table with one row per run and a final "mean" row}.
    """
    names = [r if isinstance(r, str) else r.name for r in runs]
    accs = [float(a) for a in acc_per_run]
    if len(accs) != len(names):
        raise ValueError(f"{len(accs)} accuracies for {len(names)} runs")
    if not accs:
        raise ValueError("lake_report needs at least one run")
    for name, a in zip(names, accs):
        if not (math.isfinite(a) and 0.0 <= a <= 1.0):
            raise ValueError(f"accuracy of {name} is {a}; accuracies are fractions in [0, 1], not percent")
    errors = [100.0 * (1.0 - a) for a in accs]
    mean_error = sum(errors) / len(errors)
    rows = ["| run | error (%) |", "| --- | ---: |"]
    rows += [f"| {n} | {e:.1f} |" for n, e in zip(names, errors)]
    rows.append(f"| **mean** | **{mean_error:.2f}** |")
    return {
        "runs": [{"run": n, "accuracy": a, "error": e} for n, a, e in zip(names, accs, errors)],
        "error_per_run": dict(zip(names, errors)),
        "mean_error": mean_error,
        "mean_accuracy": sum(accs) / len(accs),
        "markdown": "\n".join(rows) + "\n",
    }
