"""fewshot-table on hand-made results.json files: cells, pooling across seeds, paper diff, order, CSV, errors."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest

from fewshot import table
from fewshot.cells import t95
from fewshot.table import aggregate, collect, main, to_csv, to_markdown


def write_run(
    folder: Path,
    *,
    algo: str = "maml",
    dataset: str = "omniglot",
    ways: int = 5,
    shots: int = 1,
    seed: int = 0,
    acc: float = 0.987,
    ci: float = 0.004,
    episodes: int = 600,
    paper=(98.7, 0.4),
    name: str | None = None,
    **extra,
) -> Path:
    """A results.json shaped like engine.make_results writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    results = {
        "name": name or f"{algo}_{dataset}_{ways}w{shots}s",
        "algo": algo,
        "dataset": dataset,
        "dataset_split": "finn" if dataset == "omniglot" else None,
        "backbone": "conv4",
        "ways": ways,
        "shots": shots,
        "queries": 15,
        "seed": seed,
        "iterations": 60000,
        "meta_batch_size": 32,
        "train_seconds": 123.4,
        "best_val": {"val_acc": 0.97, "iteration": 500},
        "device": "cpu",
        "test": {"episodes": episodes, "acc_mean": acc, "acc_ci95": ci, "step_acc": [0.2, acc]},
        "paper": None if paper is None else {"source": "Finn et al. 2017, Table 1", "acc": paper[0], "ci95": paper[1]},
        **extra,
    }
    path = folder / "results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def only(rows):
    assert len(rows) == 1, rows
    return rows[0]


def test_single_seed_uses_the_runs_own_interval(tmp_path):
    write_run(tmp_path / "run", acc=0.9512, ci=0.0042, paper=(98.7, 0.4))
    row = only(aggregate(collect([tmp_path / "run"])))
    assert row.n_seeds == 1 and not row.pooled and row.seeds == (0,) and row.episodes == (600,)
    assert row.mean == pytest.approx(95.12) and row.ci95 == pytest.approx(0.42)
    assert row.diff == pytest.approx(95.12 - 98.7)
    md = to_markdown([row])
    assert "| maml | omniglot | 5-way 1-shot | 95.12 ± 0.42 | 1 | 600 | 98.70 ± 0.40 | -3.58 |" in md
    assert "†" not in md and "run's own interval" in md


def test_three_seeds_pool_across_seeds(tmp_path):
    # per-seed means 95, 97, 96 %: mean 96, sample sd 1.0, interval t(2 df) * 1.0 / sqrt(3) = 4.303 / 1.732 = 2.484
    for seed, acc in enumerate([0.95, 0.97, 0.96]):
        write_run(
            tmp_path / "sweep" / f"{seed}_maml_omniglot_5w1s_seed{seed}",
            seed=seed,
            acc=acc,
            ci=0.004,
            paper=(98.7, None),
        )
    row = only(aggregate(collect([tmp_path / "sweep"])))
    assert row.pooled and row.seeds == (0, 1, 2)
    assert row.mean == pytest.approx(96.0)
    assert row.ci95 == pytest.approx(4.303 * 1.0 / math.sqrt(3)) and f"{row.ci95:.2f}" == "2.48"
    assert row.diff == pytest.approx(96.0 - 98.7)
    md = to_markdown([row])
    assert "| 96.00 ± 2.48 † | 3 | 600 | 98.70 | -2.70 |" in md
    assert "† Pooled over seeds" in md and "t·sd/√n_seeds" in md and "Student's t" in md


@pytest.mark.parametrize("df, quantile", [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (60, 2.000), (120, 1.980)])
def test_the_across_seed_interval_uses_students_t(df, quantile):
    """Two or three seeds are far from the normal 1.96; the quantiles are the tables' (60, 120: the expansion)."""
    assert t95(df) == pytest.approx(quantile, abs=2e-3)


def test_quantiles_fall_towards_the_normal_one():
    values = [t95(df) for df in range(1, 500)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] == pytest.approx(1.96, abs=5e-3)
    with pytest.raises(ValueError, match="at least 1 degree"):
        t95(0)


def test_paper_missing_or_null_gives_no_diff(tmp_path):
    write_run(tmp_path / "a", paper=None)
    write_run(tmp_path / "b", algo="protonet", paper=(None, None))
    rows = aggregate(collect([tmp_path]))
    assert [(r.algo, r.paper_acc, r.diff) for r in rows] == [("maml", None, None), ("protonet", None, None)]
    assert to_markdown(rows).count("| – | – |") == 2


def test_rows_sorted_like_the_paper_tables(tmp_path):
    cells = [
        ("protonet", "omniglot", 5, 1),
        ("maml", "miniimagenet", 5, 1),
        ("maml", "omniglot", 20, 1),
        ("aaa", "omniglot", 5, 1),
        ("matching", "omniglot", 5, 1),
        ("maml", "omniglot", 5, 5),
        ("fomaml", "omniglot", 5, 1),
        ("maml", "omniglot", 5, 1),
        ("maml", "cub", 5, 1),
        ("maml", "synthetic", 5, 1),
        ("maml", "omniglot", 20, 5),
    ]
    for i, (algo, dataset, ways, shots) in enumerate(cells):
        write_run(tmp_path / f"r{i}", algo=algo, dataset=dataset, ways=ways, shots=shots)
    rows = aggregate(collect([tmp_path]))
    assert [(r.algo, r.dataset, r.ways, r.shots) for r in rows] == [
        ("maml", "omniglot", 5, 1),
        ("maml", "omniglot", 5, 5),
        ("maml", "omniglot", 20, 1),
        ("maml", "omniglot", 20, 5),
        ("fomaml", "omniglot", 5, 1),
        ("matching", "omniglot", 5, 1),
        ("protonet", "omniglot", 5, 1),
        ("aaa", "omniglot", 5, 1),
        ("maml", "miniimagenet", 5, 1),
        ("maml", "cub", 5, 1),
        ("maml", "synthetic", 5, 1),
    ]


def test_cells_keep_presets_and_settings_apart(tmp_path):
    # Same algo and setting, two preset names: two rows, and the name column appears for the non-default one.
    write_run(tmp_path / "a", seed=0, acc=0.95)
    write_run(tmp_path / "b", seed=0, acc=0.90, name="maml_omniglot_5w1s_lr0.1")
    # Same name, another backbone: never pooled by default.
    write_run(tmp_path / "c", seed=1, acc=0.80, backbone="mlp")
    rows = aggregate(collect([tmp_path]))
    assert sorted((r.name, r.backbone, r.n_seeds) for r in rows) == [
        ("maml_omniglot_5w1s", "conv4", 1),
        ("maml_omniglot_5w1s", "mlp", 1),
        ("maml_omniglot_5w1s_lr0.1", "conv4", 1),
    ]
    md = to_markdown(rows)
    assert md.startswith("| run | algo | dataset | setting | backbone |")


def test_by_name_pools_what_cell_keeps_apart_and_warns(tmp_path):
    write_run(tmp_path / "a", seed=0, acc=0.95)
    write_run(tmp_path / "c", seed=1, acc=0.97, backbone="mlp")
    warnings: list[str] = []
    row = only(aggregate(collect([tmp_path]), by="name", warn=warnings.append))
    assert row.seeds == (0, 1) and row.mean == pytest.approx(96.0) and row.backbone == "conv4/mlp"
    assert any("differ in backbone" in w for w in warnings)


def test_duplicate_seed_keeps_the_newer_file(tmp_path):
    old = write_run(tmp_path / "old", seed=0, acc=0.90)
    new = write_run(tmp_path / "new", seed=0, acc=0.95)
    os.utime(old, (1_000_000, 1_000_000))
    warnings: list[str] = []
    row = only(aggregate(collect([tmp_path]), warn=warnings.append))
    assert row.seeds == (0,) and row.mean == pytest.approx(95.0) and row.files == (str(new),)
    assert len(warnings) == 1 and "seed 0" in warnings[0]


def test_eval_results_only_with_include_eval(tmp_path):
    write_run(tmp_path / "train", acc=0.95)
    write_run(tmp_path / "eval_val", acc=0.93, train_seconds=None, checkpoint="/x/best.pt", eval_split="val")
    assert [r.source for r in aggregate(collect([tmp_path]))] == ["train"]
    rows = aggregate(collect([tmp_path], include_eval=True))
    assert sorted(r.source for r in rows) == ["eval:val", "train"]
    val = next(r for r in rows if r.source == "eval:val")
    assert val.mean == pytest.approx(93.0) and val.diff is None  # the paper's numbers are test numbers
    # A folder with only eval results says how to include them.
    write_run(tmp_path / "only_eval" / "e", checkpoint="/x/best.pt", eval_split="test")
    with pytest.raises(table.TableError, match="--include-eval"):
        collect([tmp_path / "only_eval"])


def test_nested_sweep_folders_are_found(tmp_path):
    root = tmp_path / "outputs"
    write_run(root / "maml_omniglot_5w1s" / "2024-01-01_00-00-00", seed=0, acc=0.95)
    write_run(root / "multirun" / "2024-01-02" / "10-00-00" / "0_maml_omniglot_5w1s_seed1", seed=1, acc=0.97)
    write_run(root / "multirun" / "2024-01-02" / "10-00-00" / "1_protonet_omniglot_5w1s_seed0", algo="protonet")
    (root / "multirun" / "2024-01-02" / "10-00-00" / "multirun.yaml").write_text("x: 1\n")
    results = collect([root, root / "maml_omniglot_5w1s"])  # overlapping paths: each file once
    assert len(results) == 3
    rows = aggregate(results)
    assert [(r.algo, r.seeds) for r in rows] == [("maml", (0, 1)), ("protonet", (0,))]


def test_corrupt_file_is_skipped_with_a_warning(tmp_path, capsys):
    write_run(tmp_path / "good", acc=0.95)
    bad = tmp_path / "bad" / "results.json"
    bad.parent.mkdir()
    bad.write_text('{"name": "maml_omniglot_5w1s", "test": {')  # truncated
    incomplete = write_run(tmp_path / "incomplete")
    data = json.loads(incomplete.read_text())
    del data["test"]["acc_mean"]
    incomplete.write_text(json.dumps(data))
    results = collect([tmp_path])
    assert [r["_path"] for r in results] == [str(tmp_path / "good" / "results.json")]
    err = capsys.readouterr().err
    assert f"fewshot-table: warning: skipping {bad}" in err
    assert f"skipping {incomplete}" in err and "test.acc_mean" in err


def test_csv_content(tmp_path, monkeypatch):
    for seed, acc in enumerate([0.95, 0.97, 0.96]):
        write_run(tmp_path / "runs" / f"s{seed}", seed=seed, acc=acc, paper=(98.7, 0.4))
    write_run(tmp_path / "runs" / "p", algo="protonet", acc=0.99, ci=0.002, paper=None)
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 0
    lines = list(csv.DictReader(open(tmp_path / "fewshot_table.csv")))  # the default place: the working folder
    assert [(r["algo"], r["n_seeds"], r["seeds"], r["interval"]) for r in lines] == [
        ("maml", "3", "0;1;2", "seeds"),
        ("protonet", "1", "0", "episodes"),
    ]
    maml, proto = lines
    assert float(maml["acc_mean"]) == pytest.approx(96.0) and float(maml["acc_ci95"]) == pytest.approx(2.4843, abs=1e-4)
    assert float(maml["paper_acc"]) == 98.7 and float(maml["paper_ci95"]) == 0.4
    assert float(maml["diff"]) == pytest.approx(-2.7)
    assert maml["episodes"] == "600" and maml["paper_source"] == "Finn et al. 2017, Table 1"
    assert float(proto["acc_mean"]) == pytest.approx(99.0) and float(proto["acc_ci95"]) == pytest.approx(0.2)
    assert proto["paper_acc"] == proto["paper_ci95"] == proto["diff"] == ""
    # --csv puts it elsewhere (folders created); the text matches to_csv
    assert main(["runs", "--csv", str(tmp_path / "out" / "t.csv")]) == 0
    assert (tmp_path / "out" / "t.csv").read_text() == to_csv(aggregate(collect([tmp_path / "runs"])))


def test_main_prints_the_markdown_table(tmp_path, capsys):
    write_run(tmp_path / "run", acc=0.9512, ci=0.0042)
    assert main([str(tmp_path / "run"), "--csv", str(tmp_path / "t.csv")]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("| algo | dataset | setting | test accuracy (%) |") and "95.12 ± 0.42" in out
    assert "All rows: backbone conv4, data split finn, queries 15" in out
    assert "wrote" in err and "wrote" not in out  # stdout stays pure Markdown


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_bad_path_is_one_error_line_and_exit_2(tmp_path, capsys, make):
    path = tmp_path / "nowhere"
    if make == "empty":
        path.mkdir()
    assert main([str(path), "--csv", str(tmp_path / "t.csv")]) == 2
    out, err = capsys.readouterr()
    expected = "does not exist" if make == "missing" else "holds no results.json"
    assert out == "" and err.count("\n") == 1 and err.startswith(f"fewshot-table: error: {path} {expected}")
    assert not (tmp_path / "t.csv").exists()


def test_everything_corrupt_is_an_error(tmp_path, capsys):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("not json")
    assert main([str(tmp_path), "--csv", str(tmp_path / "t.csv")]) == 2
    err = capsys.readouterr().err
    assert "warning: skipping" in err and "error:" in err and "no usable" in err


def test_plot_flag_writes_a_chart(tmp_path):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run", acc=0.95)
    out = tmp_path / "bars.png"
    assert main([str(tmp_path / "run"), "--csv", str(tmp_path / "t.csv"), "--plot", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def write_regression_run(folder: Path, seed: int, mse: float, ci: float = 0.01, **test) -> Path:
    """A sinusoid run's results.json as engine.make_results writes it: test.metric "mse", no paper number."""
    path = write_run(folder, dataset="sinusoid", ways=1, shots=10, seed=seed, paper=None, name="maml_sinusoid_k10")
    data = json.loads(path.read_text())
    data["test"] = {"episodes": 600, "metric": "mse", "mse_mean": mse, "mse_ci95": ci, "step_mse": [3.0, 0.5, mse]}
    data["test"].update(test)
    path.write_text(json.dumps(data))
    return path


def test_regression_cells_are_shown_as_mse_and_never_pooled_with_accuracy(tmp_path, capsys):
    """A sinusoid run's results.json carries an MSE (test.metric "mse"): the table reads it as it is (no percent),
    pools its seeds like any cell, and keeps it apart from accuracy rows in the table, the CSV and the chart."""
    write_regression_run(tmp_path / "s0", seed=0, mse=0.10)
    write_regression_run(tmp_path / "s1", seed=1, mse=0.12)
    write_run(tmp_path / "acc", seed=0, acc=0.96, ci=0.004)
    rows = aggregate(collect([tmp_path]))
    acc, mse = sorted(rows, key=lambda r: r.metric)
    assert acc.metric == "acc" and acc.mean == pytest.approx(96.0) and acc.ci95 == pytest.approx(0.4)
    assert mse.metric == "mse" and mse.seeds == (0, 1) and mse.mean == pytest.approx(0.11)
    assert mse.ci95 == pytest.approx(t95(1) * math.sqrt(2 * 0.01**2) / math.sqrt(2))  # sd of 0.10, 0.12; 2 seeds
    assert mse.setting == "10-shot regression" and mse.diff is None and mse.shown == "0.1100 ± 0.1271"

    mixed = to_markdown(rows)
    assert "| test (% or MSE) |" in mixed and "| 0.1100 ± 0.1271 MSE † |" in mixed and "| 96.00 ± 0.40 |" in mixed
    assert "MSE: the query points' mean squared error" in mixed and "Accuracy in percent" in mixed
    alone = to_markdown([mse])
    assert "| test MSE |" in alone and "| 0.1100 ± 0.1271 † |" in alone and "Accuracy in percent" not in alone

    by_metric = {r["metric"]: r for r in csv.DictReader(to_csv(rows).splitlines())}
    assert float(by_metric["mse"]["mse_mean"]) == pytest.approx(0.11) and by_metric["mse"]["acc_mean"] == ""
    assert float(by_metric["acc"]["acc_mean"]) == pytest.approx(96.0) and by_metric["acc"]["mse_mean"] == ""

    # An MSE without its number, or a metric fewshot does not know, is skipped with the reason.
    write_regression_run(tmp_path / "bad", seed=2, mse=0.1)
    data = json.loads((tmp_path / "bad" / "results.json").read_text())
    del data["test"]["mse_mean"]
    (tmp_path / "bad" / "results.json").write_text(json.dumps(data))
    write_regression_run(tmp_path / "r2", seed=3, mse=0.1, metric="r2")
    capsys.readouterr()
    assert {r["seed"] for r in collect([tmp_path])} == {0, 1}
    err = capsys.readouterr().err
    assert '"test.mse_mean" is missing' in err and "\"test.metric\" is 'r2'; fewshot knows acc, mse" in err


def test_flatten_names_leaves_by_dotted_key():
    from fewshot.flat import flatten

    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None}) == {"a.b": 1, "a.c.d": [1, 2], "f": None}
