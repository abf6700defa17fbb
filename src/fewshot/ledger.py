"""RESULTS.md, the results ledger: every paper preset, and what fewshot measured for it.

    fewshot-table --ledger PATH... [-o RESULTS.md]        (make ledger: from the runs kept under results/)

Made only from real runs' results.json files, never typed by hand. Its parts:
- Full budget: runs of a preset exactly as it stands (its iterations and test episodes, the values its file sets,
  and no override beyond the seed, the device, where files live, or one restating the preset's value), one row per
  preset, seeds pooled as fewshot-table does.
- Per instance: for the full-budget sequence cells (MANN), the accuracy at each instance of a class beside the
  paper's columns (paper.instance_acc), as Santoro et al. report it.
- Regression: the full-budget regression cells (sinusoid, test.metric "mse"), their test MSE with the MSE before
  adapting and after one step; the paper plots these (Figure 3), so there is no paper column.
- Reduced or modified: every other run filed under a preset's name, with what differs (an override that restates
  the preset's own value is not a difference; a setting the preset has changed since the run is). Not comparable
  with the paper; kept apart so that nobody mistakes them for the cell. Its sequence runs (a MANN variant) get their own
  per-instance table after it, with what differs.
- Replaced: a run of a seed that a later run of the same cell and seed replaced (newest by recorded date).
- Not yet run: presets without a full-budget row, with the reason.

Plain Python like fewshot-table: the presets are read as YAML files, without composing them through Hydra.
"""

from __future__ import annotations

import importlib.resources
import shlex
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional, Sequence

from omegaconf import OmegaConf

from fewshot.cells import (
    Row,
    aggregate,
    is_neutral,
    measured_overrides,
    metric_of,
    newest_per_seed,
    override_key,
    tests_final_weights,
)
from fewshot.flat import flatten, under

# Why a preset may have no full-budget row yet, by dataset; anything else simply has not been run.
PENDING = {
    "miniimagenet": "miniImageNet images are not on the machines fewshot has run on (only the split files)",
}
NOT_RUN = "not run at full budget yet"


@dataclass(frozen=True)
class Revision:
    """A setting a preset file used to hold: runs filed before `until` (results.json's date, when the run ended)
    without overriding it were trained with `was`, whatever the file says now. Read by date only where
    results.json's `config` does not hold the key (all runs from before config was recorded); a run of any date
    whose command sets the key back to `was` is told in the same words ("trained with KEY=was, the preset now ...")."""

    key: str
    was: object
    until: str


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    iterations: int
    episodes: int
    paper_acc: Optional[float]
    paper_source: str
    paper_ci95: Optional[float] = None
    paper_instance_acc: Optional[tuple[Optional[float], ...]] = None  # sequence presets: per instance of a class
    test_weights: str = "best"  # eval.weights: the checkpoint its test reads, best.pt or the final weights
    split: Optional[str] = None  # the dataset's split (omniglot: finn, vinyals, vinyals_trainval, ...), if it names one
    test_steps: Optional[int] = None  # algo.eval_inner_steps, where the preset sets it
    settings: dict = field(default_factory=dict, hash=False)  # what the preset file sets, by dotted key
    revisions: tuple[Revision, ...] = ()


def _conf_root() -> Path:
    return Path(str(importlib.resources.files("fewshot.conf")))


def load_presets(conf: Optional[Path] = None) -> dict[str, Preset]:
    """conf/experiment/*.yaml by name; iterations and episodes fall back to fewshot.config's defaults."""
    conf = conf or _conf_root()
    from fewshot.config import EvalConfig, TrainerConfig  # the defaults a preset does not override

    iterations, episodes, weights = TrainerConfig().iterations, EvalConfig().episodes, EvalConfig().weights
    presets = {}
    for path in sorted((conf / "experiment").glob("*.yaml")):
        node = OmegaConf.load(path)
        defaults = OmegaConf.to_container(node).get("defaults", [])
        dataset = next(
            (d["override /dataset"] for d in defaults if isinstance(d, dict) and "override /dataset" in d), "omniglot"
        )
        paper = node.get("paper") or {}
        settings = flatten({k: v for k, v in OmegaConf.to_container(node).items() if k not in NOT_SETTINGS})
        presets[node.get("name", path.stem)] = Preset(
            name=node.get("name", path.stem),
            dataset=dataset,
            iterations=int(settings.get("trainer.iterations", iterations)),
            episodes=int(settings.get("eval.episodes", episodes)),
            paper_acc=paper.get("acc"),
            paper_ci95=paper.get("ci95"),
            paper_source=paper.get("source", ""),
            paper_instance_acc=tuple(paper["instance_acc"]) if paper.get("instance_acc") else None,
            test_weights=str(settings.get("eval.weights", weights)),
            split=settings.get("dataset.split") or _dataset_split(conf, dataset),
            test_steps=settings.get("algo.eval_inner_steps"),
            settings=settings,
            revisions=tuple(Revision(r["key"], r["was"], str(r["until"])) for r in node.get("revisions") or ()),
        )
    return presets


# Keys of a preset file that are not settings a run trains or tests with.
NOT_SETTINGS = ("defaults", "name", "paper", "revisions", "hydra")


def _dataset_split(conf: Path, dataset: str) -> Optional[str]:
    """The split a dataset config names, through the configs it builds on (omniglot_vinyals -> omniglot)."""
    path = conf / "dataset" / f"{dataset}.yaml"
    if not path.exists():
        return None
    node = OmegaConf.to_container(OmegaConf.load(path))
    if "split" in node:
        return node["split"]
    parents = [d for d in node.get("defaults", []) if isinstance(d, str) and not d.startswith("/") and d != "_self_"]
    return _dataset_split(conf, parents[0]) if parents else None


def _overrides(command: Optional[str]) -> list[str]:
    return shlex.split(command)[1:] if command else []


def _experiment(command: Optional[str]) -> Optional[str]:
    """The preset a command line chose (experiment=NAME), if any."""
    return next((o.split("=", 1)[1] for o in _overrides(command) if o.startswith("experiment=")), None)


# What differences() says in its own words (iterations, test episodes, the checkpoint tested).
BUDGET_KEYS = ("trainer.iterations", "eval.episodes", "eval.weights")


def differences(result: dict, preset: Preset) -> list[str]:
    """What makes a run other than its preset's full-budget cell; empty when it is that cell."""
    diffs = []
    if result.get("iterations", 0) != preset.iterations:  # more is not the cell either
        diffs.append(f"{result.get('iterations'):,} of {preset.iterations:,} iterations")
    if result["test"]["episodes"] != preset.episodes:
        diffs.append(f"{result['test']['episodes']} of {preset.episodes} test episodes")
    if preset.split and result.get("dataset_split") and result["dataset_split"] != preset.split:
        diffs.append(f"trained on the {result['dataset_split']} split, the preset on {preset.split}")
    diffs += test_differences(result, preset)
    if result.get("command") is None:
        diffs.append("command not recorded")
    budget = BUDGET_KEYS  # already said above
    if preset.test_steps is not None and tested_steps(result) is not None:  # so are the test's inner steps
        budget += ("algo.eval_inner_steps",)
    overrides = measured_overrides(result.get("command"), tests_final_weights(result)) or ()
    former = _former_values(result, preset)  # said by revised_differences, in the revision's words
    changed = [
        o
        for o in overrides
        if override_key(o) not in budget and not _restates(o, preset) and override_key(o) not in former
    ]
    if changed:
        diffs.append("overrides " + " ".join(changed))
    return diffs + revised_differences(result, preset)


def revised_differences(result: dict, preset: Preset) -> list[str]:
    """The values a run trained with that its preset file no longer sets: keys its command did not set (an override
    of trainer= or algo= names every key below it), and keys its command set back to a value the file once held
    (_former_values: one wording, so one row, with the runs that got that value from the file). Neutral keys
    (eval.meta_batch_size, device.*, validation's where the run tested its final weights) and the budget, said by
    differences() already, are left out."""
    named = {override_key(o) for o in _overrides(result.get("command"))}
    former = _former_values(result, preset)
    record = _record(result)  # flattened once, read per key
    final = tests_final_weights(result)
    diffs = []
    for key, now in preset.settings.items():
        if key in _REVISED_BUDGET or is_neutral(key, final) or (under(key, named) and key not in former):
            continue
        then = record.get(key, former[key]) if key in former else trained_with(result, preset, key, record)
        if then is not _UNKNOWN and then != now:
            # a former value as its revision writes it, however recorded or typed (5.0 and 5 read alike: one row)
            was = _revision_value(preset, key, then)
            diffs.append(f"trained with {key}={then if was is _UNKNOWN else was}, the preset now {now}")
    return diffs


# The keys revised_differences leaves to differences() and test_differences (the test's inner steps).
_REVISED_BUDGET = BUDGET_KEYS + ("algo.eval_inner_steps",)


def _former_values(result: dict, preset: Preset) -> dict[str, object]:
    """The keys a run's command set to a value the preset file once held (one of its revisions), with that value;
    the last override of a key is the one Hydra applied. Neutral and budget keys, and keys the file no longer sets,
    are left to the override's own wording."""
    last = {override_key(o): o for o in measured_overrides(result.get("command"), tests_final_weights(result)) or ()}
    former = {}
    for key, override in last.items():
        parsed = _parsed(override)
        if parsed is None or key not in preset.settings or key in _REVISED_BUDGET:
            continue
        if _revision_value(preset, key, parsed[1]) is not _UNKNOWN:
            former[key] = parsed[1]
    return former


def _revision_value(preset: Preset, key: str, value: object) -> object:
    """The `was` of a revision of `key` equal to `value`, as the revision writes it (5 for 5.0); else _UNKNOWN."""
    return next((r.was for r in preset.revisions if r.key == key and r.was == value), _UNKNOWN)


_UNKNOWN = object()


def _parsed(override: str) -> Optional[tuple[str, object]]:
    """An override's key and value as Hydra reads them (1e-3 == 0.001); None for deletions and what does not parse."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_override(override)
    except HydraException:
        return None
    return None if parsed.is_delete() else (parsed.key_or_group, parsed.value())


def _restates(override: str, preset: Preset) -> bool:
    """An override that sets a key to the value the preset file gives it: the preset's own setting, asked again."""
    parsed = _parsed(override)
    return parsed is not None and parsed[0] in preset.settings and parsed[1] == preset.settings[parsed[0]]


def trained_with(result: dict, preset: Preset, key: str, record: Optional[dict] = None) -> object:
    """The value a run had for a setting its command did not override: from results.json's `config` (the resolved
    settings, in runs since it was recorded), else the preset's value at the run's date (its revisions); _UNKNOWN
    where neither says (the preset's value now is taken). `record`: _record(result), where the caller has it."""
    record = _record(result) if record is None else record
    if key in record:
        return record[key]
    date = result.get("date") or ""
    # the earliest revision still after the run: the value the file held when the run was made
    for revision in sorted((r for r in preset.revisions if r.key == key), key=lambda r: r.until):
        if date < revision.until:
            return revision.was
    return _UNKNOWN


def _record(result: dict) -> dict:
    """results.json's `config` (the record of what the run trained with) by dotted key; empty in runs from before it."""
    return flatten(result.get("config") or {})


def tested_steps(result: dict) -> Optional[int]:
    """The inner steps a run's test adapted with: results.json's tested.inner_steps or, in files from before it,
    the length of step_acc / step_mse (the score before adapting and after each step); None where neither says."""
    steps = (result.get("tested") or {}).get("inner_steps")
    if steps is None:
        curve = result["test"].get("step_acc") or result["test"].get("step_mse")
        steps = len(curve) - 1 if curve else None
    return steps


def test_differences(result: dict, preset: Preset) -> list[str]:
    """How a run's test differs from its preset's: the inner steps it adapted with (tested_steps) and the checkpoint
    it read (runs from before eval.weights read best.pt)."""
    diffs = []
    steps = tested_steps(result)
    if preset.test_steps is not None and steps is not None and steps != preset.test_steps:
        diffs.append(f"tested after {steps} inner steps, the preset after {preset.test_steps}")
    tested, wanted = (result.get("tested") or {}).get("checkpoint", "best.pt"), f"{preset.test_weights}.pt"
    if tested != wanted:
        diffs.append(f"tested {tested}, the preset tests {wanted}")
    return diffs


def _decimals(x: Optional[float]) -> int:
    return 0 if x is None else max(0, -Decimal(repr(float(x))).normalize().as_tuple().exponent)


def _paper_number(x: float, ci95: Optional[float] = None) -> str:
    """A paper's number as it publishes it: its own decimals (97.68, 98.7), or its interval's where YAML's float
    dropped a trailing zero (43.40 ± 0.78 reads 43.4)."""
    return f"{x:.{max(1, _decimals(x), _decimals(ci95))}f}"


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _joined(values: Sequence[object]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if v is not None)) or "–"


def _row_line(row: Row, runs: list[dict], extra: Optional[str] = None) -> str:
    value = row.shown + (" MSE" if row.metric == "mse" else "") + (" †" if row.pooled else "")
    paper = "–" if row.paper_acc is None else _paper_number(row.paper_acc, row.paper_ci95)
    diff = "–" if row.diff is None else f"{row.diff:+.2f}"
    cells = [row.name, row.setting, value, paper, diff, *_run_cells(row, runs)]
    if extra is not None:
        cells.insert(2, extra)
    return _line(cells)


def _line(cells: list[str]) -> str:
    """A table line; the last cell (the commands, already in backticks) is not escaped."""
    return "| " + " | ".join(_cell(c) if i < len(cells) - 1 else c for i, c in enumerate(cells)) + " |"


def _run_cells(row: Row, runs: list[dict]) -> list[str]:
    """The columns every table shares after the numbers: seeds, episodes, iterations, time, device, date, command."""
    commands = "<br>".join(f"`{_cell(c)}`" for c in dict.fromkeys(r.get("command") or "–" for r in runs))
    return [
        ", ".join(map(str, row.seeds)),
        _joined(r["test"]["episodes"] for r in runs),
        _joined(f"{r.get('iterations'):,}" for r in runs),
        _joined(r.get("train_seconds") and f"{r['train_seconds']:.0f}" for r in runs),
        _joined(d for r in runs for d in [*r.get("train_devices", []), r.get("device")]),  # resumed elsewhere: each
        _joined((r.get("date") or "")[:10] or None for r in runs),
        commands,
    ]


HEADER = [
    "preset",
    "setting",
    "test accuracy (%)",
    "paper (%)",
    "ours − paper",
    "seeds",
    "test episodes",
    "iterations",
    "train s",
    "device",
    "date",
    "command",
]
# The reduced/modified and replaced runs' tables: what a run differs by, after its setting.
MODIFIED_HEADER = HEADER[:2] + ["differs by"] + HEADER[2:]
REGRESSION_HEADER = HEADER[:2] + ["test MSE", "inner steps", "MSE before adapting", "MSE after 1 step"] + HEADER[5:]


def _regression_line(row: Row, runs: list[dict], extra: Optional[str] = None) -> str:
    """A regression cell: its test MSE (after the preset's test-time inner steps), and the MSE before adapting and
    after one step, each the mean over the seeds' test tasks (results.json's test.step_mse)."""
    curves = [r["test"]["step_mse"] for r in runs if r["test"].get("step_mse")]
    same = len(curves) == len(runs) and len({len(c) for c in curves}) == 1

    def at(step: int) -> str:
        return f"{sum(c[step] for c in curves) / len(curves):.4f}" if same and len(curves[0]) > step else "–"

    steps = str(len(curves[0]) - 1) if same else "–"
    return _line(
        [row.name, row.setting, row.shown + (" †" if row.pooled else ""), steps, at(0), at(1)] + _run_cells(row, runs)
    )


def _instance_lines(groups: dict, presets: dict[str, Preset], heading: str, intro: str, extra: bool) -> list[str]:
    """The per-instance table of the sequence cells (MANN) among `groups`, keyed as rows() takes them (name, or
    with extra (name, what differs), which gets a "differs by" column): ours, mean over the kept seeds, beside the
    paper's column where it has one."""
    lines = []
    # by preset name, variants of one preset in the order the modified table lists them
    for key, runs in sorted(groups.items(), key=lambda item: item[0][0] if extra else item[0]):
        name, differs = key if extra else (key, None)
        kept, _ = newest_per_seed(runs, warn=lambda m: None)
        curves = [r["test"]["instance_acc"] for r in kept if r["test"].get("instance_acc")]
        if not curves or len({len(c) for c in curves}) != 1:
            continue
        paper = presets[name].paper_instance_acc or ()
        cells = []
        for k, values in enumerate(zip(*curves)):
            ours = 100 * sum(values) / len(values)
            theirs = paper[k] if k < len(paper) else None
            cells.append(f"{ours:.1f}" + ("" if theirs is None else f" ({theirs:.1f}, {ours - theirs:+.1f})"))
        seeds = ", ".join(str(r.get("seed")) for r in kept if r["test"].get("instance_acc"))
        lead = f"| {name} | " + ("" if differs is None else f"{_cell(differs)} | ")
        lines.append((len(cells), lead + f"{seeds} | " + " | ".join(cells) + " |"))
    if not lines:
        return []
    width = max(n for n, _ in lines)
    header = ["preset", *(["differs by"] if extra else []), "seeds", *(f"instance {k}" for k in range(1, width + 1))]
    return ["", heading, "", intro, "", *_table(header, [line + " |" * (width - n) for n, line in lines])]


def _table(header: list[str], lines: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *lines]


def ledger_markdown(results: Sequence[dict], presets: dict[str, Preset], source: str) -> str:
    full: dict[str, list[dict]] = {}
    # presets run at full budget whose only differences are in the test or values the preset has changed since
    retested: dict[str, list[str]] = {}
    other: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        preset = presets.get(r["name"]) or presets.get(_experiment(r.get("command")))
        if preset is None:
            continue  # not a paper cell: fewshot-table shows it, the ledger does not
        r = {**r, "name": preset.name}  # a renamed run of a preset is listed with it, the rename as a difference
        diffs = differences(r, preset)
        if diffs and set(diffs) <= {*test_differences(r, preset), *revised_differences(r, preset)}:
            known = retested.setdefault(preset.name, [])
            known += [d for d in diffs if d not in known]
        if diffs:
            other.setdefault((r["name"], "; ".join(diffs)), []).append(r)
        else:
            full.setdefault(r["name"], []).append(r)

    earlier: list[tuple[Row, str]] = []  # runs of a seed that a later run of the same cell replaced

    def rows(groups: dict, extra: bool, line: Callable[..., str] = _row_line) -> list[str]:
        lines = []
        for key, runs in groups.items():
            kept, replaced = newest_per_seed(runs, warn=lambda m: None)
            # differences() compared their commands with the preset; their recorded settings are compared here
            (row,) = aggregate(kept, by="name", commands_checked=True)
            lines.append((row, line(row, kept, key[1] if extra else None)))
            for r in replaced:
                (old,) = aggregate([r], by="name", warn=lambda m: None)
                earlier.append((old, _row_line(old, [r], key[1] if extra else "–")))
        return [line for _, line in sorted(lines, key=lambda pair: pair[0].name)]

    out = [
        "# Results ledger",
        "",
        f"Generated by `fewshot-table --ledger {source} -o RESULTS.md` (`make ledger`) from the results.json of "
        "real runs kept under `results/`; never edited by hand. Accuracy in percent, mean ± 95% interval "
        "(one seed: over its test episodes, 1.96·std/√episodes; † several seeds: across seeds, t·sd/√seeds with "
        "Student's t for seeds − 1 degrees of freedom). "
        "`train s` is the training time without validation and test.",
        "",
        "## Full budget",
        "",
        "Runs of a preset as it stands: its iterations and test episodes, the values its file sets, no override but "
        "the seed, device and paths (or one restating the preset's value), and validation's settings where the test "
        "reads the final weights (there validation only draws the learning curve).",
        "",
    ]
    regression = {name: runs for name, runs in full.items() if metric_of(runs[0]) == "mse"}
    accuracy = {name: runs for name, runs in full.items() if name not in regression}
    out += _table(HEADER, rows(accuracy, extra=False)) if accuracy else ["(none yet)"]
    out += _instance_lines(
        accuracy,
        presets,
        "## Accuracy per instance",
        "Sequence cells (Santoro et al. 2016, Table 1): test accuracy (%) at the k-th instance of each class, ours "
        "(mean over the seeds) and, where the paper has that column, (paper, ours − paper). The full-budget table's "
        "accuracy is over instances 2 and later.",
        extra=False,
    )
    if regression:
        out += [
            "",
            "## Regression",
            "",
            "Sinusoid cells (Finn et al. 2017, Section 5.1): the mean squared error on the test tasks' query points "
            "after the preset's test-time inner steps, mean ± 95% interval as above; beside it the MSE before adapting "
            "and after one step (means). The paper shows these only as a plot (Figure 3): no paper column.",
            "",
            *_table(REGRESSION_HEADER, rows(regression, extra=False, line=_regression_line)),
        ]
    out += [
        "",
        "## Reduced budget or modified",
        "",
        "Filed under a preset's name but not its full protocol: not comparable with the paper.",
        "",
    ]
    out += _table(MODIFIED_HEADER, rows(other, extra=True)) if other else ["(none)"]
    out += _instance_lines(
        other,
        presets,
        "## Per instance, reduced budget or modified",
        "The sequence runs of the table above, instance by instance as in the full-budget one (paper, ours − paper); "
        "not the paper's protocol.",
        extra=True,
    )
    if earlier:
        out += [
            "",
            "## Replaced by a later run of the same seed",
            "",
            "Kept for the record, pooled nowhere: a later run of the same cell and seed stands in the tables above.",
            "",
        ]
        out += _table(MODIFIED_HEADER, [line for _, line in sorted(earlier, key=lambda p: p[0].name)])
    out += ["", "## Not yet run at full budget", "", "| preset | paper (%) | source | reason |", "|---|---|---|---|"]
    for name, p in sorted(presets.items()):
        if name not in full:
            paper = "–" if p.paper_acc is None else _paper_number(p.paper_acc, p.paper_ci95)
            reason = PENDING.get(p.dataset, NOT_RUN)
            if name in retested:
                reason = "run at full budget, but " + "; ".join(retested[name])
            out.append(f"| {name} | {paper} | {_cell(p.paper_source) or '–'} | {reason} |")
    return "\n".join(out) + "\n"
