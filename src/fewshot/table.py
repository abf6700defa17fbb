"""fewshot-table: gather results.json files from run and sweep folders into a paper-style table.

    fewshot-table PATH... [--csv OUT.csv] [--by cell|name] [--include-eval] [--plot OUT.png]
    fewshot-table --ledger PATH... [-o RESULTS.md]     (the results ledger: see fewshot.ledger)

Cells. A row of the table is one *cell*: the runs that differ only in their seed.
  --by cell (default): the key is everything results.json records about the experiment, so that nothing that
      changes the number is ever pooled: name, algo, dataset, dataset_split, backbone, ways, shots, queries,
      iterations, meta_batch_size, and the source (a training run, or fewshot-eval on a given split).
      `name` is in the key so that two presets sharing every recorded setting (say, one that overrides an inner
      learning rate) stay apart. Within a cell, seeds whose other settings differ are refused (check_poolable: by
      results.json's config where the runs record it, else by their commands).
  --by name: the key is (name, dataset, ways, shots, source): runs filed under one experiment name are pooled even
      if one of the fields above differs (runs that record their settings are still refused where those differ:
      iterations, meta_batch_size); the row then shows the values joined by "/" and a warning says so.

Numbers. Accuracies are percent; an MSE (regression cells: results.json's test.metric "mse") is shown as it is, and
never pooled with an accuracy. One seed: the run's own mean ± 95% interval over its test episodes
(1.96·std/√episodes, from results.json). Several seeds: the mean of the per-seed means ± t·sd/√n_seeds with the
sample sd (ddof=1) and Student's t 97.5% quantile for n_seeds − 1 degrees of freedom (12.71 for 2 seeds, 4.30 for
3), i.e. the interval across seeds; a footnote under the table says which rows are pooled.
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
import sys
from pathlib import Path
from typing import Optional, Sequence

from fewshot.atomic import atomic_write
from fewshot.cells import (  # noqa: F401  (the cells API, also reached as fewshot.table.*)
    ALGO_ORDER,
    CELL_FIELDS,
    DATASET_ORDER,
    NAME_FIELDS,
    NEUTRAL_OVERRIDES,
    PROG,
    Row,
    TableError,
    Value,
    aggregate,
    check_poolable,
    collect,
    sort_key,
)
from fewshot.errors import FewshotError

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
OPTIONAL_COLUMNS = (
    ("backbone", "backbone"),
    ("dataset_split", "data split"),
    ("queries", "queries"),
    ("iterations", "iterations"),
    ("meta_batch_size", "meta-batch"),
    ("source", "source"),
)


def _default_name(row: Row) -> str:
    return f"{row.algo}_{row.dataset}_{row.ways}w{row.shots}s"


def to_markdown(rows: Sequence[Row]) -> str:
    """The Markdown table with its footnotes.

    Fixed columns: algo, dataset, setting, test accuracy (or MSE), seeds, episodes, paper, diff. A run-name column
    appears when some run is not named <algo>_<dataset>_<W>w<K>s (so presets that share a setting can be told
    apart); settings such as backbone or queries appear as columns when they differ between rows, else in a line
    under the table."""
    if not rows:
        return "(no results)\n"
    show_name = any(r.name != _default_name(r) for r in rows)
    varying = [(f, title) for f, title in OPTIONAL_COLUMNS if len({getattr(r, f) for r in rows}) > 1]
    constant = [
        (f, title)
        for f, title in OPTIONAL_COLUMNS
        if (f, title) not in varying and getattr(rows[0], f) not in (None, "train")
    ]

    metrics = {r.metric for r in rows}
    mixed = len(metrics) > 1
    value_title = {"acc": "test accuracy (%)", "mse": "test MSE"}[metrics.pop()] if not mixed else "test (% or MSE)"
    header = (
        (["run"] if show_name else [])
        + ["algo", "dataset", "setting"]
        + [t for _, t in varying]
        + [value_title, "seeds", "episodes", "paper (%)", "ours − paper"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        acc = r.shown + (" MSE" if mixed and r.metric == "mse" else "") + (" †" if r.pooled else "")
        diff = "–" if r.diff is None else f"{r.diff:+.2f}"
        cells = (
            ([r.name] if show_name else [])
            + [r.algo, r.dataset, r.setting]
            + [_show(getattr(r, f)) for f, _ in varying]
            + [acc, str(r.n_seeds), _episodes(r), _pm(r.paper_acc, r.paper_ci95), diff]
        )
        lines.append("| " + " | ".join(cells) + " |")

    notes = [""]
    if any(r.metric == "acc" for r in rows):
        notes.append("Accuracy in percent, mean ± 95% interval; ours − paper in points.")
    if any(r.metric == "mse" for r in rows):
        notes.append("MSE: the query points' mean squared error after the test-time inner steps, mean ± 95% interval.")
    if any(not r.pooled for r in rows):
        notes.append("One seed: ± the run's own interval over its test episodes, 1.96·std/√episodes.")
    if any(r.pooled for r in rows):
        notes.append(
            "† Pooled over seeds: mean of the per-seed test accuracies ± t·sd/√n_seeds "
            "(sample sd; Student's t, n_seeds − 1 degrees of freedom), the interval across seeds."
        )
    if constant:
        notes.append("All rows: " + ", ".join(f"{title} {_show(getattr(rows[0], f))}" for f, title in constant) + ".")
    sources = list(dict.fromkeys(r.paper_source for r in rows if r.paper_source and r.paper_acc is not None))
    if sources:
        notes.append("Paper: " + "; ".join(sources) + ".")
    if any(not r.is_test for r in rows):
        notes.append("Rows not on the test split are not compared with the paper.")
    return "\n".join(lines + notes) + "\n"


CSV_COLUMNS = CELL_FIELDS + (
    "n_seeds",
    "seeds",
    "episodes",
    "acc_mean",
    "acc_ci95",
    "mse_mean",
    "mse_ci95",
    "interval",
    "paper_acc",
    "paper_ci95",
    "paper_source",
    "diff",
)


def _num(x: Optional[float], digits: int = 4) -> Optional[float]:
    return None if x is None else round(x, digits)  # 4 decimals of a percent: no float noise like 96.00000000000001


def to_csv(rows: Sequence[Row]) -> str:
    """CSV text, one line per row; acc_mean, acc_ci95, paper_acc, paper_ci95 and diff in percent / points,
    empty when unknown; a regression row fills mse_mean and mse_ci95 (6 decimals) in their place. `interval` says
    whether the interval is across "seeds" or over one run's "episodes"."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(
            {
                "name": r.name,
                "algo": r.algo,
                "dataset": r.dataset,
                "dataset_split": r.dataset_split,
                "backbone": r.backbone,
                "ways": r.ways,
                "shots": r.shots,
                "queries": r.queries,
                "iterations": r.iterations,
                "meta_batch_size": r.meta_batch_size,
                "source": r.source,
                "n_seeds": r.n_seeds,
                "seeds": ";".join(map(str, r.seeds)),
                "episodes": ";".join(map(str, sorted(set(r.episodes)))),
                "metric": r.metric,
                f"{r.metric}_mean": _num(r.mean, 4 if r.metric == "acc" else 6),
                f"{r.metric}_ci95": _num(r.ci95, 4 if r.metric == "acc" else 6),
                "interval": "seeds" if r.pooled else "episodes",
                "paper_acc": _num(r.paper_acc),
                "paper_ci95": _num(r.paper_ci95),
                "paper_source": r.paper_source,
                "diff": _num(r.diff),
            }
        )
    return buf.getvalue()


# ---- command --------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Gather results.json from run and sweep folders into a paper-style Markdown table (stdout) "
        "and a CSV; several seeds of one cell are pooled across seeds.",
    )
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="run folders, sweep folders or results.json")
    p.add_argument(
        "--csv",
        type=Path,
        default=Path("fewshot_table.csv"),
        metavar="OUT.csv",
        help="where to write the CSV (default: ./fewshot_table.csv)",
    )
    p.add_argument(
        "--by",
        choices=("cell", "name"),
        default="cell",
        help="cell: pool only runs that differ in nothing but the seed (default); "
        "name: pool by run name, dataset, ways and shots",
    )
    p.add_argument(
        "--include-eval",
        action="store_true",
        help="also list fewshot-eval results (results.json with a checkpoint key), as their own rows",
    )
    p.add_argument(
        "--plot", type=Path, metavar="OUT.png", help="also draw the rows as a bar chart with the paper's numbers"
    )
    p.add_argument(
        "--ledger",
        action="store_true",
        help="write the results ledger instead (every preset: full-budget rows, reduced runs, not yet run)",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("RESULTS.md"),
        metavar="OUT.md",
        help="where --ledger writes (default: ./RESULTS.md)",
    )
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
