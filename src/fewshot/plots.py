"""Charts of runs and tables: a run's learning curve, and a table's accuracies beside the paper's.

matplotlib is imported inside the functions (importing fewshot stays cheap) and drawn with the Agg canvas on a
plain Figure, never pyplot: no global backend switch, no figures left open in a long-lived process.

    python -m fewshot.plots RUN_DIR...     # writes RUN_DIR/learning_curve.png for each run folder
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from fewshot.atomic import atomic_write
from fewshot.cells import ALGO_ORDER

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from fewshot.cells import Row

METRIC_COLUMNS = ("iteration", "train_loss", "train_acc", "val_acc", "val_ci95")
MSE_COLUMNS = ("iteration", "train_loss", "train_mse", "val_mse", "val_ci95")  # regression runs (sinusoid)


def _figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("the charts need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: "Figure", out: Path) -> Path:
    """PNG written beside `out` then renamed into place, so a viewer never opens half an image."""
    out = Path(out)
    atomic_write(out, lambda f: fig.savefig(f, format="png"))
    return out


def read_metrics(path: Path) -> dict[str, list[float]]:
    """metrics.csv as columns, one entry per validation, sorted by iteration.

    A resumed run re-appends the iterations after its last checkpoint, so the last row of each iteration wins.
    An incomplete last line (the run is writing it) is dropped; any other bad line raises ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: no validation has been logged in this run folder yet")
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    if not lines:
        raise ValueError(f"{path} is empty: no validation has been logged yet")
    columns = MSE_COLUMNS if "val_mse" in lines[0] else METRIC_COLUMNS
    missing = [c for c in columns if c not in lines[0]]
    if missing:
        raise ValueError(f"{path} lacks the columns {', '.join(missing)}")
    by_iteration: dict[int, dict[str, float]] = {}
    for i, line in enumerate(lines):
        try:
            row = {c: float(line[c]) for c in columns}
        except (TypeError, ValueError):
            if i == len(lines) - 1 and i > 0:
                break  # being written right now
            raise ValueError(f"{path}, line {i + 2}: not a row of numbers: {line}") from None
        by_iteration[int(row["iteration"])] = row
    if not by_iteration:
        raise ValueError(f"{path} holds no complete row")
    ordered = [by_iteration[k] for k in sorted(by_iteration)]
    return {c: [r[c] for r in ordered] for c in columns}


def _run_info(run_dir: Path) -> tuple[str, dict[str, Any]]:
    """(title, results.json or {}) from results.json, else .hydra/config.yaml (a run still training), else the
    folder name."""
    results_path = run_dir / "results.json"
    try:
        results = json.loads(results_path.read_text(encoding="utf-8"))
        if isinstance(results, dict) and results.get("name"):
            return _title(results.get("name"), results), results
    except (OSError, ValueError):
        pass
    try:
        import yaml  # PyYAML comes with omegaconf

        cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text(encoding="utf-8"))
        algo, dataset, episode = cfg["algo"]["name"], cfg["dataset"]["name"], cfg["episode"]
        name = str(cfg.get("name", ""))
        if not name or "${" in name:  # saved unresolved: rebuild the default pattern
            name = f"{algo}_{dataset}_{episode['ways']}w{episode['shots']}s"
        info = {
            "algo": algo,
            "dataset": dataset,
            "ways": episode["ways"],
            "shots": episode["shots"],
            "backbone": (cfg.get("backbone") or {}).get("name"),
            "seed": cfg.get("seed"),
        }
        return _title(name, info), {}
    except Exception:  # no or unreadable Hydra folder: the folder name will do
        return run_dir.resolve().name, {}


def _title(name: str, info: dict) -> str:
    parts = []
    if info.get("ways") is not None and info.get("shots") is not None:
        parts.append(f"{info['ways']}-way {info['shots']}-shot")
    for key, label in (("backbone", ""), ("seed", "seed ")):
        if info.get(key) is not None:
            parts.append(f"{label}{info[key]}")
    return name + (f"  ({', '.join(parts)})" if parts else "")


def plot_learning_curve(run_dir: Path) -> Path:
    """Write run_dir/learning_curve.png from run_dir/metrics.csv and return its path.

    Left: training loss and training accuracy (two y axes) against iterations, averaged over each validation
    interval as logged. Right: validation accuracy with its 95% band; the best validation (the checkpoint that
    is tested) is marked, with the test accuracy when results.json exists. Raises ValueError when metrics.csv is
    missing, empty or unreadable. A regression run (train_mse/val_mse columns) is drawn the same way in MSE,
    where the best validation is the lowest."""
    run_dir = Path(run_dir)
    m = read_metrics(run_dir / "metrics.csv")
    mse = "val_mse" in m  # regression: MSE as is, lower is better; classification: accuracy in %
    key, scale, unit, label = ("mse", 1.0, "", "MSE") if mse else ("acc", 100.0, "%", "accuracy")
    title, results = _run_info(run_dir)
    it = m["iteration"]
    marker = "o" if len(it) <= 30 else None  # a handful of validations: show the points themselves

    fig = _figure(11, 4.2)
    ax_loss, ax_val = fig.subplots(1, 2)
    fig.suptitle(title)

    c_loss, c_acc = "tab:red", "tab:blue"
    ax_loss.plot(it, m["train_loss"], color=c_loss, marker=marker, ms=3, label="training loss")
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("training loss", color=c_loss)
    ax_loss.tick_params(axis="y", colors=c_loss)
    ax_loss.set_title("training (mean over each validation interval)", fontsize=10)
    ax_loss.grid(alpha=0.3)
    ax_acc = ax_loss.twinx()
    ax_acc.plot(it, [scale * a for a in m[f"train_{key}"]], color=c_acc, marker=marker, ms=3, label=f"training {label}")
    ax_acc.set_ylabel(f"training {label}" + (" (%)" if unit else ""), color=c_acc)
    ax_acc.tick_params(axis="y", colors=c_acc)
    handles = ax_loss.get_lines() + ax_acc.get_lines()
    ax_loss.legend(handles, [h.get_label() for h in handles], loc="center right", fontsize=9)

    val = [scale * a for a in m[f"val_{key}"]]
    ci = [scale * c for c in m["val_ci95"]]
    ax_val.fill_between(
        it,
        [v - c for v, c in zip(val, ci)],
        [v + c for v, c in zip(val, ci)],
        color="tab:green",
        alpha=0.2,
        lw=0,
        label="95% interval",
    )
    ax_val.plot(it, val, color="tab:green", marker=marker, ms=3, label=f"validation {label}")
    best = max(range(len(val)), key=lambda i: (-val[i] if mse else val[i], -i))  # the first best, as training keeps it
    ax_val.plot(
        [it[best]],
        [val[best]],
        marker="*",
        ms=13,
        color="tab:orange",
        ls="none",
        label=f"best: {val[best]:.{4 if mse else 2}f}{unit} at {int(it[best])}",
    )
    test = results.get("test") if isinstance(results.get("test"), dict) else None
    if test and isinstance(test.get(f"{key}_mean"), (int, float)):
        ax_val.axhline(
            scale * test[f"{key}_mean"],
            color="0.3",
            ls="--",
            lw=1,
            label=f"test: {scale * test[f'{key}_mean']:.{4 if mse else 2}f} ± "
            f"{scale * test.get(f'{key}_ci95', 0):.{4 if mse else 2}f}{unit}",
        )
    ax_val.set_xlabel("iteration")
    ax_val.set_ylabel(f"validation {label}" + (" (%)" if unit else ""))
    ax_val.set_title("validation", fontsize=10)
    ax_val.grid(alpha=0.3)
    ax_val.legend(loc="upper right" if mse else "lower right", fontsize=9)
    if len(it) == 1:  # one validation so far: a band of zero width would not show
        ax_val.errorbar(it, val, yerr=ci, fmt="none", ecolor="tab:green", capsize=4)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
        if len(it) == 1:  # give the x axis some width around the one point
            ax.set_xlim(max(0.0, it[0] * 0.5), it[0] * 1.5 + 1)
    return _save(fig, run_dir / "learning_curve.png")


def _algo_colors(rows: Sequence["Row"]) -> dict[str, Any]:
    from matplotlib import colormaps

    algos = sorted({r.algo for r in rows}, key=lambda a: (ALGO_ORDER.index(a) if a in ALGO_ORDER else 99, a))
    cmap = colormaps["tab10"]
    return {a: cmap(i % 10) for i, a in enumerate(algos)}


def _ylim(rows: Sequence["Row"]) -> tuple[float, float]:
    """Zoom to the values: few-shot accuracies sit high (Omniglot ~95-99%), where a 0-100 axis hides every
    difference that matters; the axis still starts at 0 when a value is low. An MSE axis starts at 0."""
    papers = [(r.paper_acc, r.paper_ci95 or 0.0) for r in rows if r.paper_acc is not None]
    lows = [r.mean - r.ci95 for r in rows] + [a - c for a, c in papers]
    highs = [r.mean + r.ci95 for r in rows] + [a + c for a, c in papers]
    lo, hi = min(lows), max(highs)
    if any(r.metric != "acc" for r in rows):
        return 0.0, 1.15 * hi
    span = max(hi - lo, 2.0)
    bottom = 0.0 if lo - span < 20 else 5 * math.floor((lo - 0.6 * span) / 5)
    top = hi + 0.15 * (hi - bottom)
    return bottom, min(top, 101.0) if hi <= 100 else top


def plot_table_bars(rows: Sequence["Row"], out: Path) -> Path:
    """Bar chart of a table's rows (fewshot.table.aggregate's order): our test accuracy with its 95% interval as
    error bars, one colour per algorithm, and the paper's number as a black line across the bar with its
    interval beside it when known. One panel per dataset, each with its own (zoomed) accuracy axis; regression
    rows (MSE) get panels of their own, on an MSE axis from 0.
    Returns `out` (PNG, written atomically). Raises ValueError without rows."""
    if not rows:
        raise ValueError("no rows to plot")
    groups: list[list["Row"]] = []
    for r in rows:  # consecutive rows of one dataset, as the table sorts them
        if groups and (groups[-1][0].dataset, groups[-1][0].metric) == (r.dataset, r.metric):
            groups[-1].append(r)
        else:
            groups.append([r])
    colors = _algo_colors(rows)
    fig = _figure(max(4.5, 1.8 + 1.05 * len(rows) + 0.5 * len(groups)), 4.6)
    axes = fig.subplots(1, len(groups), squeeze=False, gridspec_kw={"width_ratios": [len(g) for g in groups]})[0]

    width = 0.62
    any_paper = False
    previous = None
    for ax, group in zip(axes, groups):
        xs = list(range(len(group)))
        ax.bar(
            xs,
            [r.mean for r in group],
            width=width,
            color=[colors[r.algo] for r in group],
            alpha=0.85,
            yerr=[r.ci95 for r in group],
            ecolor="0.1",
            capsize=5,
            error_kw={"lw": 1.3},
            zorder=2,
        )
        for x, r in zip(xs, group):
            if r.paper_acc is None:
                continue
            any_paper = True
            left, right = x - width / 2 - 0.06, x + width / 2 + 0.06
            ax.hlines(r.paper_acc, left, right, color="black", lw=2.2, zorder=4)
            if r.paper_ci95:  # a grey band, so it never reads as (or hides) our error bar
                ax.fill_between(
                    [left, right],
                    r.paper_acc - r.paper_ci95,
                    r.paper_acc + r.paper_ci95,
                    color="black",
                    alpha=0.18,
                    lw=0,
                    zorder=3,
                )
        ax.set_ylim(*_ylim(group))
        ax.set_xlim(-0.6, len(group) - 0.4)
        ax.set_xticks(
            xs,
            [f"{r.algo}\n{r.setting}" + (f"\n{r.n_seeds} seeds" if r.pooled else "") for r in group],
            fontsize=8.5,
        )
        ax.set_title(group[0].dataset, fontsize=11, fontweight="bold")
        ax.grid(axis="y", alpha=0.3, zorder=0)
        if group[0].metric != previous:  # a regression panel (MSE) after accuracy ones labels its own axis
            ax.set_ylabel("test accuracy (%)" if group[0].metric == "acc" else "test MSE")
        previous = group[0].metric

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=c, alpha=0.85, label=a) for a, c in colors.items()]
    handles.append(Line2D([], [], color="0.1", marker="|", ls="none", ms=12, mew=1.3, label="ours, 95% interval"))
    if any_paper:
        handles.append((Patch(color="black", alpha=0.18, lw=0), Line2D([], [], color="black", lw=2.2)))
    labels = (
        [h.get_label() for h in handles[:-1]] + ["paper (± its interval)"]
        if any_paper
        else [h.get_label() for h in handles]
    )
    fig.legend(handles=handles, labels=labels, loc="outside right upper", fontsize=9, frameon=False)
    return _save(fig, Path(out))


def main(argv: Optional[list[str]] = None) -> int:
    """python -m fewshot.plots RUN_DIR...: write each run folder's learning_curve.png; exit 2 on a bad folder."""
    status = 0
    for run_dir in sys.argv[1:] if argv is None else argv:
        try:
            print(plot_learning_curve(Path(run_dir)))
        except (ValueError, OSError) as e:
            print(f"fewshot-plots: error: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
