"""Charts: the learning curve of a run folder and the table's bar chart are written as real PNG files."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from fewshot import plots  # noqa: E402
from fewshot.table import Row  # noqa: E402

HEADER = ["iteration", "train_loss", "train_acc", "val_acc", "val_ci95", "train_seconds"]


def write_metrics(run_dir: Path, rows: list[list[float]]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)
    return path


def curve(n: int = 8) -> list[list[float]]:
    return [[100 * i, 1.5 / i, 0.5 + 0.05 * i, 0.45 + 0.05 * i, 0.01, 2.0 * i] for i in range(1, n + 1)]


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_learning_curve_png(tmp_path):
    run = tmp_path / "run"
    write_metrics(run, curve())
    (run / "results.json").write_text(
        json.dumps(
            {
                "name": "maml_omniglot_5w1s",
                "ways": 5,
                "shots": 1,
                "backbone": "conv4",
                "seed": 0,
                "test": {"episodes": 600, "acc_mean": 0.8, "acc_ci95": 0.01},
            }
        )
    )
    out = plots.plot_learning_curve(run)
    assert out == run / "learning_curve.png"
    assert_png(out)
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []  # the temporary file was renamed


def test_learning_curve_of_a_run_still_training(tmp_path):
    # no results.json yet, one validation so far, a half-written last line, a repeated iteration (resume)
    run = tmp_path / "job"
    path = write_metrics(run, [[100, 1.0, 0.5, 0.5, 0.02, 1.0], [100, 0.9, 0.55, 0.52, 0.02, 1.0]])
    with open(path, "a") as f:
        f.write("200,0.8")
    assert plots.read_metrics(path)["train_loss"] == [0.9]
    assert_png(plots.plot_learning_curve(run))


def test_missing_or_empty_metrics_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="metrics.csv does not exist"):
        plots.plot_learning_curve(tmp_path)
    (tmp_path / "metrics.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        plots.plot_learning_curve(tmp_path)
    write_metrics(tmp_path, [])
    with pytest.raises(ValueError, match="empty"):
        plots.plot_learning_curve(tmp_path)
    assert not (tmp_path / "learning_curve.png").exists()


def test_bad_metrics_row_raises_value_error(tmp_path):
    write_metrics(tmp_path, [[100, "nan?", 0.5, 0.5, 0.01, 1.0], [200, 0.5, 0.5, 0.5, 0.01, 2.0]])
    with pytest.raises(ValueError, match="line 2"):
        plots.plot_learning_curve(tmp_path)


def row(algo: str, dataset: str, ways: int, shots: int, acc: float, ci: float, paper, seeds=(0,)) -> Row:
    return Row(
        name=f"{algo}_{dataset}_{ways}w{shots}s",
        algo=algo,
        dataset=dataset,
        dataset_split=None,
        backbone="conv4",
        ways=ways,
        shots=shots,
        queries=15,
        iterations=100,
        meta_batch_size=32,
        source="train",
        seeds=tuple(seeds),
        episodes=(600,) * len(seeds),
        mean=acc,
        ci95=ci,
        paper_acc=paper[0],
        paper_ci95=paper[1],
    )


def test_table_bars_png(tmp_path):
    rows = [
        row("maml", "omniglot", 5, 1, 98.2, 0.5, (98.7, 0.4), seeds=(0, 1, 2)),
        row("protonet", "omniglot", 20, 5, 98.9, 0.2, (98.9, None)),
        row("matching", "omniglot", 5, 1, 97.0, 0.4, (None, None)),
        row("maml", "miniimagenet", 5, 1, 47.5, 1.8, (48.7, 1.84)),
    ]
    out = plots.plot_table_bars(rows, tmp_path / "charts" / "bars.png")
    assert out == tmp_path / "charts" / "bars.png"
    assert_png(out)
    with pytest.raises(ValueError):
        plots.plot_table_bars([], tmp_path / "none.png")


def test_importing_fewshot_table_does_not_import_matplotlib():
    import subprocess

    code = "import sys, fewshot.table, fewshot.plots; print('matplotlib' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_table_bars_give_regression_rows_an_mse_panel(tmp_path):
    mse = dataclasses.replace(row("maml", "sinusoid", 1, 10, 0.11, 0.02, (None, None)), metric="mse")
    assert plots._ylim([mse]) == (0.0, pytest.approx(1.15 * 0.13))  # from 0, not zoomed like an accuracy
    assert_png(plots.plot_table_bars([row("maml", "omniglot", 5, 1, 98.2, 0.5, (98.7, 0.4)), mse], tmp_path / "b.png"))
