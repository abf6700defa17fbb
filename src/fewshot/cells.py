"""The cells behind fewshot-table and the ledger: results.json files collected, checked and pooled across seeds.

A cell is the runs that differ only in their seed (see fewshot.table for how cells are keyed and pooled).
Plain Python (no Hydra, no torch), so the commands that read results start fast."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

from fewshot.flat import flatten, under
from fewshot.metrics import METRICS
from fewshot.resultfiles import TableError, _warn_stderr, collect, metric_of  # noqa: E402,F401  (collect, metric_of: re-exported)

PROG = "fewshot-table"
Z95 = 1.96  # normal 95% quantile, as in results.json's own per-run interval (hundreds of test episodes)
# Student's t 97.5% quantiles for 1-30 degrees of freedom: a handful of seeds is far from normal (2 seeds: 12.71).
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t95(df: int) -> float:
    """The two-sided 95% quantile of Student's t with `df` degrees of freedom (beyond 30: z + (z^3 + z) / 4df)."""
    if df < 1:
        raise ValueError(f"t95 needs at least 1 degree of freedom, got {df}")
    return T975[df - 1] if df <= len(T975) else Z95 + (Z95**3 + Z95) / (4 * df)


# Paper-table order: Omniglot before miniImageNet, others alphabetical after; the MAML paper's methods first.
DATASET_ORDER = ("omniglot", "miniimagenet")
ALGO_ORDER = ("maml", "fomaml", "matching", "protonet")

Value = Union[int, str, None]

# Command-line overrides that do not change what a run measures: the seed, where it runs and where files live.
NEUTRAL_OVERRIDES = (
    "experiment",
    "seed",
    "device",
    "data_root",
    "cache_dir",
    "dataset.root",
    "dataset.split_dir",
    "dataset.cache_dir",
    "hydra.",
    "logger",
    "resume",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.cuda_graph",  # the same step, replayed as one CUDA graph or launched op by op
    "algo.compile_step",  # MANN's same step, through torch.compile or eager
    "eval.meta_batch_size",
    "eval.cuda_graph",
)

# Validation's settings, neutral where a run tests its final weights alone: validation then draws the learning curve
# and picks best.pt, which is not tested, and leaves training's random stream as it was, so the same weights are
# tested either way (tests/test_engine.py::test_validation_does_not_disturb_training, every algorithm; on a CPU).
# A run whose validation score is not finite stops there with an error, and files no result to compare.
VALIDATION_KEYS = ("trainer.val_every", "trainer.val_episodes")


# ---- aggregate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One cell of the table: its test `metric` (results.json's test.metric, "acc" or "mse"), `mean` ± `ci95`
    (accuracy in percent, MSE as it is), the interval across seeds when `pooled`."""

    name: str
    algo: str
    dataset: str
    dataset_split: Optional[str]
    backbone: str
    ways: int
    shots: int
    queries: Value
    iterations: Value
    meta_batch_size: Value
    source: str  # "train" for training runs, "eval:<split>" for fewshot-eval results
    seeds: tuple[int, ...]
    episodes: tuple[int, ...]  # test episodes per seed, in seed order
    mean: float
    ci95: float
    paper_acc: Optional[float] = None
    paper_ci95: Optional[float] = None
    paper_source: Optional[str] = None
    files: tuple[str, ...] = ()
    metric: str = "acc"

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def pooled(self) -> bool:
        """True when the interval is across seeds rather than the one run's own."""
        return self.n_seeds > 1

    @property
    def setting(self) -> str:
        if self.metric == "mse":  # a regression task has no classes: Finn et al.'s "K-shot regression"
            return f"{self.shots}-shot regression"
        return f"{self.ways}-way {self.shots}-shot"

    @property
    def shown(self) -> str:
        """mean ± ci95 as the tables print it: an accuracy's percent with 2 decimals, an MSE with 4."""
        digits = 2 if METRICS[self.metric].percent else 4
        return f"{self.mean:.{digits}f} ± {self.ci95:.{digits}f}"

    @property
    def is_test(self) -> bool:
        return self.source in ("train", "eval:test")

    @property
    def diff(self) -> Optional[float]:
        """Ours − paper in points; None without a paper number or for numbers not on the test split."""
        if self.paper_acc is None or not self.is_test:
            return None
        return self.mean - self.paper_acc


def _source(result: dict) -> str:
    if "checkpoint" in result:
        return f"eval:{result.get('eval_split', 'test')}"
    return "train"


# The recorded settings that make a cell (seed excluded), in Row field order.
CELL_FIELDS = (
    "name",
    "algo",
    "dataset",
    "dataset_split",
    "backbone",
    "ways",
    "shots",
    "queries",
    "iterations",
    "meta_batch_size",
    "source",
    "metric",
)
NAME_FIELDS = ("name", "dataset", "ways", "shots", "source", "metric")


def _field(result: dict, field: str) -> Value:
    if field == "metric":
        return metric_of(result)
    return _source(result) if field == "source" else result.get(field)


def _merge(values: list[Value]) -> Value:
    """One value when the runs agree, else the distinct values joined by '/' (only under --by name)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "/".join("–" if v is None else str(v) for v in distinct)


def _paper(result: dict) -> tuple[Optional[float], Optional[float], Optional[str]]:
    paper = result.get("paper") or {}
    acc, ci = paper.get("acc"), paper.get("ci95")
    return (
        None if acc is None else float(acc),
        None if ci is None or acc is None else float(ci),
        paper.get("source") or None,
    )


def newest_per_seed(runs: Sequence[dict], warn: Callable[[str], None] = _warn_stderr) -> tuple[list[dict], list[dict]]:
    """(kept, replaced): per seed the newest run, by its recorded date, then its file's time, then its path (a
    fresh clone gives every file the same time, so the date decides what a checkout shows); the others, with a
    warning each."""
    by_seed: dict[int, dict] = {}
    replaced = []
    for r in sorted(runs, key=lambda r: (r.get("date") or "", _mtime(r), r.get("_path", ""))):
        if r["seed"] in by_seed:
            warn(
                f"seed {r['seed']} of {r['name']} appears twice ({by_seed[r['seed']].get('_path')} and "
                f"{r.get('_path')}); keeping the newer, {r.get('_path')}"
            )
            replaced.append(by_seed[r["seed"]])
        by_seed[r["seed"]] = r
    return [by_seed[s] for s in sorted(by_seed)], replaced


def aggregate(
    results: Sequence[dict],
    by: str = "cell",
    warn: Callable[[str], None] = _warn_stderr,
    commands_checked: bool = False,
) -> list[Row]:
    """Group results into cells (see the module docstring for `by`) and pool each cell's seeds; sorted rows.
    commands_checked: the caller has compared the runs' commands itself (the ledger, against their preset, where
    `trainer.meta_lr=0.001` restating the preset's value is no difference); their recorded settings still count.

    A seed found twice in one cell (a re-run into another folder) would count one experiment twice and shrink the
    interval, so only the newest file (modification time) is kept, with a warning."""
    if by not in ("cell", "name"):
        raise ValueError(f"by must be 'cell' or 'name', not {by!r}")
    key_fields = CELL_FIELDS if by == "cell" else NAME_FIELDS
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault(tuple(_field(r, f) for f in key_fields), []).append(r)

    rows = []
    for members in groups.values():
        check_poolable(members, commands=not commands_checked, warn=warn)
        runs, _ = newest_per_seed(members, warn)
        fields = {f: _merge([_field(r, f) for r in runs]) for f in CELL_FIELDS}
        if by == "name":
            mixed = [f for f in CELL_FIELDS if f not in key_fields and len({_field(r, f) for r in runs}) > 1]
            if mixed:
                warn(
                    f"{fields['name']} ({fields['dataset']} {fields['ways']}-way {fields['shots']}-shot) pools runs "
                    f"that differ in {', '.join(mixed)}"
                )
        papers = {_paper(r) for r in runs}
        if len(papers) > 1:
            warn(f"the runs of {fields['name']} quote different paper numbers; leaving the paper column empty")
            paper: tuple = (None, None, None)
        else:
            paper = papers.pop()
        metric = fields["metric"]
        scale = 100.0 if METRICS[metric].percent else 1.0
        means = [scale * r["test"][f"{metric}_mean"] for r in runs]
        if len(runs) == 1:
            mean, ci = means[0], scale * runs[0]["test"][f"{metric}_ci95"]
        else:
            n = len(means)
            mean, ci = statistics.fmean(means), t95(n - 1) * statistics.stdev(means) / math.sqrt(n)
        rows.append(
            Row(
                **fields,
                seeds=tuple(r["seed"] for r in runs),
                episodes=tuple(r["test"]["episodes"] for r in runs),
                mean=mean,
                ci95=ci,
                paper_acc=paper[0],
                paper_ci95=paper[1],
                paper_source=paper[2],
                files=tuple(r.get("_path", "") for r in runs),
            )
        )
    return sorted(rows, key=sort_key)


def measured_overrides(command: Optional[str], final_weights: bool = False) -> Optional[tuple[str, ...]]:
    """The overrides of a recorded command that change what is measured, in command order (None when no command
    was recorded): everything but the seed, the device, paths and logging (NEUTRAL_OVERRIDES), and validation's
    settings where the run tested its final weights (`final_weights`: tests_final_weights of its results.json)."""
    if command is None:
        return None
    return tuple(o for o in shlex.split(command)[1:] if not is_neutral(override_key(o), final_weights))


def override_key(override: str) -> str:
    """The key an override names: trainer.meta_lr for trainer.meta_lr=1e-3, +x.y=3 and ~x.y alike."""
    return override.lstrip("+~").split("=", 1)[0]


def is_neutral(key: str, final_weights: bool = False) -> bool:
    """Whether a key is one of NEUTRAL_OVERRIDES or below one (device.name, hydra.run.dir); with `final_weights`
    (a run that tested its final weights alone), also one of VALIDATION_KEYS."""
    return under(key, NEUTRAL_OVERRIDES) or (final_weights and under(key, VALIDATION_KEYS))


def tests_final_weights(result: dict) -> bool:
    """Whether a run tested its final weights alone (last.pt, no ensemble of validation's best checkpoints)."""
    ensemble = ((result.get("config") or {}).get("eval") or {}).get("ensemble")  # one key: no need to flatten all
    return (result.get("tested") or {}).get("checkpoint") == "last.pt" and ensemble in (None, 0, 1)


def _streams(seed: int) -> tuple[int, ...]:
    """The 32-bit seeds a run's random streams come from (torch's CPU generator keeps 32 bits): the global seed
    and the three split streams, seed * 1000 + 0, 1, 2."""
    return tuple((seed * 1000 + k) % 2**32 for k in range(3)) + (seed % 2**32,)


def check_poolable(runs: Sequence[dict], commands: bool = True, warn: Callable[[str], None] = _warn_stderr) -> None:
    """Refuse to pool runs that are not independent seeds of one experiment: two seeds that share random streams
    (seed=2**40 repeats seed=0 exactly; pooled they give a zero interval) or runs whose settings differ beyond the
    seed. Settings are read from results.json's config (what a run trained with, however its command said it) among
    the runs that record one, over the keys they all record (a setting added in a later version defaults to the old
    behaviour); and from the commands (say, algo.similarity=cosine filed under the same name), but for keys every
    run's config holds: there an override that restates the value is no difference. commands=False: the caller
    compared the commands itself (the ledger, against the preset)."""
    owner: dict[tuple[int, int], int] = {}
    for r in runs:
        for stream in enumerate(_streams(r["seed"])):  # (which stream, its 32-bit seed): like with like
            other = owner.setdefault(stream, r["seed"])
            if other != r["seed"]:
                raise TableError(
                    f"{r['name']}: seeds {other} and {r['seed']} draw the same random streams, so their "
                    f"runs are not independent; keep one of {r.get('_path')} and the other"
                )
    recorded = [_measured_settings(r["config"], tests_final_weights(r)) for r in runs if r.get("config") is not None]
    shared = set.intersection(*(set(s) for s in recorded)) if recorded else set()
    differ = sorted(k for k in shared if any(s[k] != recorded[0][k] for s in recorded))
    if differ:
        shown = "; ".join(f"{k}: " + " vs ".join(dict.fromkeys(json.dumps(s[k]) for s in recorded)) for k in differ)
        _refuse(runs, shown)
    if not commands:
        return
    covered = shared if len(recorded) == len(runs) else set()
    overrides = [measured_overrides(r.get("command"), tests_final_weights(r)) for r in runs]
    kinds = {tuple(sorted(o for o in s if override_key(o) not in covered)) for s in overrides if s is not None}
    if len(kinds) > 1:
        _refuse(runs, " vs ".join("[" + " ".join(s) + "]" for s in sorted(kinds)))
    if 0 < len(recorded) < len(runs):
        warn(
            f"{runs[0]['name']}: {len(runs) - len(recorded)} of {len(runs)} runs record no settings (results.json "
            "from before `config`): they are pooled by their commands, which cannot show a preset changed since"
        )


def _refuse(runs: Sequence[dict], shown: str) -> None:
    raise TableError(
        f"{runs[0]['name']}: refusing to pool runs whose settings differ beyond the seed ({shown}); "
        "give them different names (name=...) or separate folders"
    )


def _measured_settings(config: dict, final_weights: bool = False) -> dict:
    """A results.json's recorded settings (config) without the neutral ones (seed, device, logging; is_neutral) and
    without what names code or a source rather than a setting (_target_, a download URL), which a later version may
    change."""
    return {k: v for k, v in flatten(config).items() if not is_neutral(k, final_weights) and not _not_a_setting(k)}


def _not_a_setting(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return leaf in ("_target_", "_partial_", "download") or leaf.endswith("url")


def _mtime(result: dict) -> float:
    try:
        return os.stat(result["_path"]).st_mtime
    except (KeyError, OSError):
        return 0.0


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())  # mini_imagenet, miniImageNet -> miniimagenet


def sort_key(row: Row) -> tuple:
    """Paper order: dataset (omniglot, miniimagenet, others alphabetical), algo (maml, fomaml, matching, protonet,
    others alphabetical), ways, shots; the remaining fields only make the order total."""
    d, a = _norm(row.dataset), row.algo.lower()
    return (
        (DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d),
        (ALGO_ORDER.index(a) if a in ALGO_ORDER else len(ALGO_ORDER), a),
        row.ways,
        row.shots,
        row.name,
        row.backbone,
        str(row.dataset_split),
        str(row.queries),
        str(row.iterations),
        str(row.meta_batch_size),
        row.source,
    )
