"""RESULTS.md, the results ledger: every paper preset, and what fewshot measured for it.

    fewshot-table --ledger PATH... [-o RESULTS.md]        (make ledger: from the runs kept under results/)

Made only from real runs' results.json files, never typed by hand. Its parts:
- Full budget: runs of a preset exactly as it stands (its iterations and test episodes, and no override
  beyond the seed, the device and where files live), one row per preset, seeds pooled as fewshot-table does.
- Per instance: for the full-budget sequence cells (MANN), the accuracy at each instance of a class beside the
  paper's columns (paper.instance_acc), as Santoro et al. report it.
- Reduced or modified: every other run filed under a preset's name, with what differs. Not comparable with the
  paper; kept apart so that nobody mistakes them for the cell.
- Replaced: a run of a seed that a later run of the same cell and seed replaced (newest by recorded date).
- Not yet run: presets without a full-budget row, with the reason.

Plain Python like fewshot-table: the presets are read as YAML files, without composing them through Hydra.
"""

from __future__ import annotations

import importlib.resources
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from omegaconf import OmegaConf

from fewshot.cells import Row, aggregate, measured_overrides, newest_per_seed

# Why a preset may have no full-budget row yet, by dataset; anything else simply has not been run.
PENDING = {
    "miniimagenet": "miniImageNet images are not on the machines fewshot has run on (only the split files)",
    "sinusoid": "regression cell (MSE), not an accuracy: `python scripts/sinusoid.py` reports it",
}
NOT_RUN = "not run at full budget yet"


@dataclass(frozen=True)
class Preset:
    name: str
    dataset: str
    iterations: int
    episodes: int
    paper_acc: Optional[float]
    paper_source: str
    paper_instance_acc: Optional[tuple[Optional[float], ...]] = None  # sequence presets: per instance of a class


def _conf_root() -> Path:
    return Path(str(importlib.resources.files("fewshot.conf")))


def load_presets(conf: Optional[Path] = None) -> dict[str, Preset]:
    """conf/experiment/*.yaml by name; iterations and episodes fall back to fewshot.config's defaults."""
    conf = conf or _conf_root()
    from fewshot.config import EvalConfig, TrainerConfig  # the defaults a preset does not override

    iterations, episodes = TrainerConfig().iterations, EvalConfig().episodes
    presets = {}
    for path in sorted((conf / "experiment").glob("*.yaml")):
        node = OmegaConf.load(path)
        defaults = OmegaConf.to_container(node).get("defaults", [])
        dataset = next(
            (d["override /dataset"] for d in defaults if isinstance(d, dict) and "override /dataset" in d), "omniglot"
        )
        paper = node.get("paper") or {}
        presets[node.get("name", path.stem)] = Preset(
            name=node.get("name", path.stem),
            dataset=dataset,
            iterations=int(OmegaConf.select(node, "trainer.iterations", default=iterations)),
            episodes=int(OmegaConf.select(node, "eval.episodes", default=episodes)),
            paper_acc=paper.get("acc"),
            paper_source=paper.get("source", ""),
            paper_instance_acc=tuple(paper["instance_acc"]) if paper.get("instance_acc") else None,
        )
    return presets


def _overrides(command: Optional[str]) -> list[str]:
    return shlex.split(command)[1:] if command else []


def _experiment(command: Optional[str]) -> Optional[str]:
    """The preset a command line chose (experiment=NAME), if any."""
    return next((o.split("=", 1)[1] for o in _overrides(command) if o.startswith("experiment=")), None)


def differences(result: dict, preset: Preset) -> list[str]:
    """What makes a run other than its preset's full-budget cell; empty when it is that cell."""
    diffs = []
    if result.get("iterations", 0) < preset.iterations:
        diffs.append(f"{result.get('iterations'):,} of {preset.iterations:,} iterations")
    if result["test"]["episodes"] < preset.episodes:
        diffs.append(f"{result['test']['episodes']} of {preset.episodes} test episodes")
    if result.get("command") is None:
        diffs.append("command not recorded")
    budget = ("trainer.iterations=", "eval.episodes=")  # already said above, as a budget
    changed = [o for o in measured_overrides(result.get("command")) or () if not o.startswith(budget)]
    if changed:
        diffs.append("overrides " + " ".join(changed))
    return diffs


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _joined(values: Sequence[object]) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values if v is not None)) or "–"


def _row_line(row: Row, runs: list[dict], extra: Optional[str] = None) -> str:
    acc = f"{row.acc_mean:.2f} ± {row.acc_ci95:.2f}" + (" †" if row.pooled else "")
    paper = "–" if row.paper_acc is None else f"{row.paper_acc:.1f}"
    diff = "–" if row.diff is None else f"{row.diff:+.2f}"
    commands = "<br>".join(f"`{_cell(c)}`" for c in dict.fromkeys(r.get("command") or "–" for r in runs))
    cells = [
        row.name,
        row.setting,
        acc,
        paper,
        diff,
        ", ".join(map(str, row.seeds)),
        _joined(r["test"]["episodes"] for r in runs),
        _joined(f"{r.get('iterations'):,}" for r in runs),
        _joined(r.get("train_seconds") and f"{r['train_seconds']:.0f}" for r in runs),
        _joined(d for r in runs for d in [*r.get("train_devices", []), r.get("device")]),  # resumed elsewhere: each
        _joined((r.get("date") or "")[:10] or None for r in runs),
        commands,
    ]
    if extra is not None:
        cells.insert(2, extra)
    return "| " + " | ".join(_cell(c) if i < len(cells) - 1 else c for i, c in enumerate(cells)) + " |"


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


def _instance_lines(full: dict[str, list[dict]], presets: dict[str, Preset]) -> list[str]:
    """The per-instance table of the full-budget sequence cells (MANN): ours, mean over the kept seeds, beside the
    paper's column where it has one."""
    lines = []
    for name, runs in sorted(full.items()):
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
        lines.append((len(cells), f"| {name} | {seeds} | " + " | ".join(cells) + " |"))
    if not lines:
        return []
    width = max(n for n, _ in lines)
    header = ["preset", "seeds", *(f"instance {k}" for k in range(1, width + 1))]
    return [
        "",
        "## Accuracy per instance",
        "",
        "Sequence cells (Santoro et al. 2016, Table 1): test accuracy (%) at the k-th instance of each class, ours "
        "(mean over the seeds) and, where the paper has that column, (paper, ours − paper). The full-budget table's "
        "accuracy is over instances 2 and later.",
        "",
        *_table(header, [line + " |" * (width - n) for n, line in lines]),
    ]


def _table(header: list[str], lines: list[str]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|", *lines]


def ledger_markdown(results: Sequence[dict], presets: dict[str, Preset], source: str) -> str:
    full: dict[str, list[dict]] = {}
    other: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        preset = presets.get(r["name"]) or presets.get(_experiment(r.get("command")))
        if preset is None:
            continue  # not a paper cell: fewshot-table shows it, the ledger does not
        r = {**r, "name": preset.name}  # a renamed run of a preset is listed with it, the rename as a difference
        diffs = differences(r, preset)
        if diffs:
            other.setdefault((r["name"], "; ".join(diffs)), []).append(r)
        else:
            full.setdefault(r["name"], []).append(r)

    earlier: list[tuple[Row, str]] = []  # runs of a seed that a later run of the same cell replaced

    def rows(groups: dict, extra: bool) -> list[str]:
        lines = []
        for key, runs in groups.items():
            kept, replaced = newest_per_seed(runs, warn=lambda m: None)
            (row,) = aggregate(kept, by="name", warn=lambda m: None)
            lines.append((row, _row_line(row, kept, key[1] if extra else None)))
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
        "Runs of a preset as it stands: its iterations and test episodes, no override but the seed, device and paths.",
        "",
    ]
    out += _table(HEADER, rows(full, extra=False)) if full else ["(none yet)"]
    out += _instance_lines(full, presets)
    out += [
        "",
        "## Reduced budget or modified",
        "",
        "Filed under a preset's name but not its full protocol: not comparable with the paper.",
        "",
    ]
    out += _table(MODIFIED_HEADER, rows(other, extra=True)) if other else ["(none)"]
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
            paper = "–" if p.paper_acc is None else f"{p.paper_acc:.1f}"
            out.append(f"| {name} | {paper} | {_cell(p.paper_source) or '–'} | {PENDING.get(p.dataset, NOT_RUN)} |")
    return "\n".join(out) + "\n"
