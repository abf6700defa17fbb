"""fewshot-table: gather results.json files from run and sweep folders into a paper-style table.

    fewshot-table PATH... [--csv OUT.csv] [--by cell|name] [--include-eval] [--plot OUT.png]
    fewshot-table --ledger PATH... [-o RESULTS.md]     (the results ledger: see fewshot.ledger)

Cells. A row of the table is one *cell*: the runs that differ only in their seed.
  --by cell (default): the key is everything results.json records about the experiment, so that nothing that
      changes the number is ever pooled: name, algo, dataset, dataset_split, backbone, ways, shots, queries,
      iterations, meta_batch_size, and the source (a training run, or fewshot-eval on a given split).
      `name` is in the key so that two presets sharing every recorded setting (say, one that overrides an inner
      learning rate) stay apart; settings that results.json does not record can only be told apart by name.
  --by name: the key is (name, dataset, ways, shots, source): runs filed under one experiment name are pooled even
      if another recorded setting differs; the row then shows the values joined by "/" and a warning says so.

Numbers. Accuracies are percent. One seed: the run's own mean ± 95% interval over its test episodes
(1.96·std/√episodes, from results.json). Several seeds: the mean of the per-seed means ± 1.96·sd/√n_seeds with the
sample sd (ddof=1), i.e. the interval across seeds; a footnote under the table says which rows are pooled.
The paper's numbers come from results.json's "paper" (the experiment preset); diff = ours − paper, in points,
only for test-split numbers.

Training runs only by default: results.json files with a "checkpoint" key (written by fewshot-eval) are skipped
unless --include-eval is given; they then form their own rows (source "eval:<split>"), never pooled with
the training run whose checkpoint they evaluated.

Everything here is plain Python (no Hydra, no torch), so the command starts fast.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

from fewshot.atomic import atomic_write
from fewshot.errors import FewshotError

PROG = "fewshot-table"
Z95 = 1.96  # normal 95% quantile, as in results.json's own per-run interval

# Paper-table order: Omniglot before miniImageNet, others alphabetical after; the MAML paper's methods first.
DATASET_ORDER = ("omniglot", "miniimagenet")
ALGO_ORDER = ("maml", "fomaml", "matching", "protonet")

Value = Union[int, str, None]

# Command-line overrides that do not change what a run measures: the seed, where it runs and where files live.
NEUTRAL_OVERRIDES = ("experiment", "seed", "device", "data_root", "cache_dir", "hydra.", "logger", "resume",
                     "trainer.log_every", "trainer.checkpoint_every", "eval.meta_batch_size")


class TableError(FewshotError):
    """A path given to fewshot-table does not exist or holds no usable results.json."""


def _warn_stderr(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


# ---- collect --------------------------------------------------------------------------------------

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
    for key in ("acc_mean", "acc_ci95"):
        v = test.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f'"test.{key}" is missing or not a finite number')
    if not isinstance(test.get("episodes"), int):
        raise ValueError('"test.episodes" is missing or not an integer')
    paper = data.get("paper")
    if paper is not None and not isinstance(paper, dict):
        raise ValueError('"paper" is not an object')


def collect(paths: Iterable[Union[str, Path]], include_eval: bool = False,
            warn: Callable[[str], None] = _warn_stderr) -> list[dict]:
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


# ---- aggregate ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    """One cell of the table. Accuracies in percent; `acc_ci95` is across seeds when `pooled`."""

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
    acc_mean: float
    acc_ci95: float
    paper_acc: Optional[float] = None
    paper_ci95: Optional[float] = None
    paper_source: Optional[str] = None
    files: tuple[str, ...] = ()

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    @property
    def pooled(self) -> bool:
        """True when the interval is across seeds rather than the one run's own."""
        return self.n_seeds > 1

    @property
    def setting(self) -> str:
        return f"{self.ways}-way {self.shots}-shot"

    @property
    def is_test(self) -> bool:
        return self.source in ("train", "eval:test")

    @property
    def diff(self) -> Optional[float]:
        """Ours − paper in points; None without a paper number or for numbers not on the test split."""
        if self.paper_acc is None or not self.is_test:
            return None
        return self.acc_mean - self.paper_acc


def _source(result: dict) -> str:
    if "checkpoint" in result:
        return f"eval:{result.get('eval_split', 'test')}"
    return "train"


# The recorded settings that make a cell (seed excluded), in Row field order.
CELL_FIELDS = ("name", "algo", "dataset", "dataset_split", "backbone", "ways", "shots", "queries", "iterations",
               "meta_batch_size", "source")
NAME_FIELDS = ("name", "dataset", "ways", "shots", "source")


def _field(result: dict, field: str) -> Value:
    return _source(result) if field == "source" else result.get(field)


def _merge(values: list[Value]) -> Value:
    """One value when the runs agree, else the distinct values joined by '/' (only under --by name)."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else "/".join("–" if v is None else str(v) for v in distinct)


def _paper(result: dict) -> tuple[Optional[float], Optional[float], Optional[str]]:
    paper = result.get("paper") or {}
    acc, ci = paper.get("acc"), paper.get("ci95")
    return (None if acc is None else float(acc), None if ci is None or acc is None else float(ci),
            paper.get("source") or None)


def aggregate(results: Sequence[dict], by: str = "cell", warn: Callable[[str], None] = _warn_stderr) -> list[Row]:
    """Group results into cells (see the module docstring for `by`) and pool each cell's seeds; sorted rows.

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
        check_poolable(members)
        by_seed: dict[int, dict] = {}
        for r in sorted(members, key=lambda r: (_mtime(r), r.get("_path", ""))):
            if r["seed"] in by_seed:
                warn(f"seed {r['seed']} of {r['name']} appears twice ({by_seed[r['seed']].get('_path')} and "
                     f"{r.get('_path')}); keeping the newer, {r.get('_path')}")
            by_seed[r["seed"]] = r
        runs = [by_seed[s] for s in sorted(by_seed)]
        fields = {f: _merge([_field(r, f) for r in runs]) for f in CELL_FIELDS}
        if by == "name":
            mixed = [f for f in CELL_FIELDS if f not in key_fields and len({_field(r, f) for r in runs}) > 1]
            if mixed:
                warn(f"{fields['name']} ({fields['dataset']} {fields['ways']}-way {fields['shots']}-shot) pools runs "
                     f"that differ in {', '.join(mixed)}")
        papers = {_paper(r) for r in runs}
        if len(papers) > 1:
            warn(f"the runs of {fields['name']} quote different paper numbers; leaving the paper column empty")
            paper: tuple = (None, None, None)
        else:
            paper = papers.pop()
        means = [100.0 * r["test"]["acc_mean"] for r in runs]
        if len(runs) == 1:
            mean, ci = means[0], 100.0 * runs[0]["test"]["acc_ci95"]
        else:
            mean, ci = statistics.fmean(means), Z95 * statistics.stdev(means) / math.sqrt(len(means))
        rows.append(Row(**fields, seeds=tuple(r["seed"] for r in runs),
                        episodes=tuple(r["test"]["episodes"] for r in runs), acc_mean=mean, acc_ci95=ci,
                        paper_acc=paper[0], paper_ci95=paper[1], paper_source=paper[2],
                        files=tuple(r.get("_path", "") for r in runs)))
    return sorted(rows, key=sort_key)


def _settings(command: Optional[str]) -> Optional[tuple[str, ...]]:
    """The overrides of a recorded command that change what is measured (None when no command was recorded)."""
    if command is None:
        return None
    return tuple(sorted(o for o in shlex.split(command)[1:] if not o.lstrip("+~").startswith(NEUTRAL_OVERRIDES)))


def _streams(seed: int) -> tuple[int, ...]:
    """The 32-bit seeds a run's random streams come from (torch's CPU generator keeps 32 bits): the global seed
    and the three split streams, seed * 1000 + 0, 1, 2."""
    return tuple((seed * 1000 + k) % 2**32 for k in range(3)) + (seed % 2**32,)


def check_poolable(runs: Sequence[dict]) -> None:
    """Refuse to pool runs that are not independent seeds of one experiment: two seeds that share random streams
    (seed=2**40 repeats seed=0 exactly; pooled they give a zero interval) or runs whose commands differ beyond
    the seed (say, one with algo.similarity=cosine filed under the same name)."""
    owner: dict[tuple[int, int], int] = {}
    for r in runs:
        for stream in enumerate(_streams(r["seed"])):  # (which stream, its 32-bit seed): like with like
            other = owner.setdefault(stream, r["seed"])
            if other != r["seed"]:
                raise TableError(f"{r['name']}: seeds {other} and {r['seed']} draw the same random streams, so their "
                                 f"runs are not independent; keep one of {r.get('_path')} and the other")
    settings = {_settings(r.get("command")) for r in runs} - {None}
    if len(settings) > 1:
        shown = " vs ".join("[" + " ".join(s) + "]" for s in sorted(settings))
        raise TableError(f"{runs[0]['name']}: refusing to pool runs whose settings differ beyond the seed ({shown}); "
                         "give them different names (name=...) or separate folders")


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
    return ((DATASET_ORDER.index(d) if d in DATASET_ORDER else len(DATASET_ORDER), d),
            (ALGO_ORDER.index(a) if a in ALGO_ORDER else len(ALGO_ORDER), a),
            row.ways, row.shots, row.name, row.backbone, str(row.dataset_split), str(row.queries),
            str(row.iterations), str(row.meta_batch_size), row.source)


# ---- render ---------------------------------------------------------------------------------------

def _pm(mean: Optional[float], ci: Optional[float]) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" if ci is None else f"{mean:.2f} ± {ci:.2f}"


def _episodes(row: Row) -> str:
    lo, hi = min(row.episodes), max(row.episodes)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _show(v: Value) -> str:
    return "–" if v is None else str(v)


# Settings shown as a column only when they vary between rows; when constant they go in one line under the table.
OPTIONAL_COLUMNS = (("backbone", "backbone"), ("dataset_split", "data split"), ("queries", "queries"),
                    ("iterations", "iterations"), ("meta_batch_size", "meta-batch"), ("source", "source"))


def _default_name(row: Row) -> str:
    return f"{row.algo}_{row.dataset}_{row.ways}w{row.shots}s"


def to_markdown(rows: Sequence[Row]) -> str:
    """The Markdown table with its footnotes.

    Fixed columns: algo, dataset, setting, accuracy, seeds, episodes, paper, diff. A run-name column appears when
    some run is not named <algo>_<dataset>_<W>w<K>s (so presets that share a setting can be told apart); settings
    such as backbone or queries appear as columns when they differ between rows, else in a line under the table."""
    if not rows:
        return "(no results)\n"
    show_name = any(r.name != _default_name(r) for r in rows)
    varying = [(f, title) for f, title in OPTIONAL_COLUMNS if len({getattr(r, f) for r in rows}) > 1]
    constant = [(f, title) for f, title in OPTIONAL_COLUMNS
                if (f, title) not in varying and getattr(rows[0], f) not in (None, "train")]

    header = (["run"] if show_name else []) + ["algo", "dataset", "setting"] + [t for _, t in varying] + \
             ["test accuracy (%)", "seeds", "episodes", "paper (%)", "ours − paper"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        acc = _pm(r.acc_mean, r.acc_ci95) + (" †" if r.pooled else "")
        diff = "–" if r.diff is None else f"{r.diff:+.2f}"
        cells = ([r.name] if show_name else []) + [r.algo, r.dataset, r.setting] + \
                [_show(getattr(r, f)) for f, _ in varying] + \
                [acc, str(r.n_seeds), _episodes(r), _pm(r.paper_acc, r.paper_ci95), diff]
        lines.append("| " + " | ".join(cells) + " |")

    notes = ["", "Accuracy in percent, mean ± 95% interval; ours − paper in points."]
    if any(not r.pooled for r in rows):
        notes.append("One seed: ± the run's own interval over its test episodes, 1.96·std/√episodes.")
    if any(r.pooled for r in rows):
        notes.append("† Pooled over seeds: mean of the per-seed test accuracies ± 1.96·sd/√n_seeds "
                     "(sample sd), the interval across seeds.")
    if constant:
        notes.append("All rows: " + ", ".join(f"{title} {_show(getattr(rows[0], f))}" for f, title in constant) + ".")
    sources = list(dict.fromkeys(r.paper_source for r in rows if r.paper_source and r.paper_acc is not None))
    if sources:
        notes.append("Paper: " + "; ".join(sources) + ".")
    if any(not r.is_test for r in rows):
        notes.append("Rows not on the test split are not compared with the paper.")
    return "\n".join(lines + notes) + "\n"


CSV_COLUMNS = ("name", "algo", "dataset", "dataset_split", "backbone", "ways", "shots", "queries", "iterations",
               "meta_batch_size", "source", "n_seeds", "seeds", "episodes", "acc_mean", "acc_ci95", "interval",
               "paper_acc", "paper_ci95", "paper_source", "diff")


def _num(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)  # 4 decimals of a percent: no float noise like 96.00000000000001


def to_csv(rows: Sequence[Row]) -> str:
    """CSV text, one line per row; acc_mean, acc_ci95, paper_acc, paper_ci95 and diff in percent / points,
    empty when unknown. `interval` says whether acc_ci95 is across "seeds" or over one run's "episodes"."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({
            "name": r.name, "algo": r.algo, "dataset": r.dataset, "dataset_split": r.dataset_split,
            "backbone": r.backbone, "ways": r.ways, "shots": r.shots, "queries": r.queries,
            "iterations": r.iterations, "meta_batch_size": r.meta_batch_size, "source": r.source,
            "n_seeds": r.n_seeds, "seeds": ";".join(map(str, r.seeds)),
            "episodes": ";".join(map(str, sorted(set(r.episodes)))),
            "acc_mean": _num(r.acc_mean), "acc_ci95": _num(r.acc_ci95),
            "interval": "seeds" if r.pooled else "episodes",
            "paper_acc": _num(r.paper_acc), "paper_ci95": _num(r.paper_ci95), "paper_source": r.paper_source,
            "diff": _num(r.diff),
        })
    return buf.getvalue()


# ---- command --------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Gather results.json from run and sweep folders into a paper-style Markdown table (stdout) "
                    "and a CSV; several seeds of one cell are pooled across seeds.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders, sweep folders or results.json")
    p.add_argument("--csv", type=Path, default=Path("fewshot_table.csv"), metavar="OUT.csv",
                   help="where to write the CSV (default: ./fewshot_table.csv)")
    p.add_argument("--by", choices=("cell", "name"), default="cell",
                   help="cell: pool only runs that differ in nothing but the seed (default); "
                        "name: pool by run name, dataset, ways and shots")
    p.add_argument("--include-eval", action="store_true",
                   help="also list fewshot-eval results (results.json with a checkpoint key), as their own rows")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="also draw the rows as a bar chart with the paper's numbers")
    p.add_argument("--ledger", action="store_true",
                   help="write the results ledger instead (every preset: full-budget rows, reduced runs, not yet run)")
    p.add_argument("-o", "--output", type=Path, default=Path("RESULTS.md"), metavar="OUT.md",
                   help="where --ledger writes (default: ./RESULTS.md)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """fewshot-table: print the Markdown table, write the CSV (and the chart with --plot); returns the exit status
    (0, or 2 with one line on stderr when a path is missing or holds no results)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and its error line already
        return int(e.code or 0)
    try:
        if args.ledger:
            from fewshot.ledger import ledger_markdown, load_presets

            text = ledger_markdown(collect(args.paths), load_presets(), " ".join(map(str, args.paths)))
            atomic_write(args.output, lambda f: f.write(text.encode("utf-8")))
            print(f"{PROG}: wrote {args.output}", file=sys.stderr)
            return 0
        rows = aggregate(collect(args.paths, include_eval=args.include_eval), by=args.by)
        print(to_markdown(rows), end="")
        text = to_csv(rows).encode("utf-8")
        atomic_write(args.csv, lambda f: f.write(text))
        print(f"{PROG}: wrote {args.csv}", file=sys.stderr)
        if args.plot is not None:
            from fewshot.plots import plot_table_bars  # matplotlib only when a chart is asked for

            print(f"{PROG}: wrote {plot_table_bars(rows, args.plot)}", file=sys.stderr)
    except (FewshotError, OSError, ImportError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
