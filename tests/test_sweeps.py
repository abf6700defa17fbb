"""Sweeps: launcher and search configs compose; a real joblib multirun yields a table with seeds pooled."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "override, target",
    [
        ("launcher=local", "hydra._internal.core_plugins.basic_launcher.BasicLauncher"),
        ("launcher=joblib", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
        ("launcher=slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
    ],
)
def test_launchers_compose(compose_cfg, override, target):
    cfg = compose_cfg("train", [override], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == target
    if override == "launcher=slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1


def test_optuna_search_composes(compose_cfg):
    cfg = compose_cfg("train", ["hparams_search=maml_omniglot_optuna", "experiment=maml_omniglot_5w1s"],
                      return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"algo.inner_lr", "trainer.meta_lr"}


@pytest.mark.slow
def test_joblib_multirun_two_seeds_pooled_in_table(tmp_path):
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    cmd = [str(BIN / "fewshot-train"), "-m", "launcher=joblib", "algo=protonet", "dataset=synthetic", "device=cpu",
           "backbone.hidden=16", "trainer=smoke", "trainer.iterations=6", "trainer.val_every=3", "eval.episodes=20",
           "episode.queries=5", "seed=0,1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.rglob("results.json"))
    assert len(jobs) == 2 and all(j.split("_")[0] in ("0", "1") for j in jobs), jobs  # numbered job folders
    seeds = sorted(json.loads(p.read_text())["seed"] for p in sweep.rglob("results.json"))
    assert seeds == [0, 1]
    assert all((p.parent / "learning_curve.png").is_file() for p in sweep.rglob("results.json"))

    out_csv = tmp_path / "table.csv"
    table = subprocess.run([str(BIN / "fewshot-table"), str(sweep), "--csv", str(out_csv)], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 1 and int(rows[0]["n_seeds"]) == 2
    accs = [json.loads(p.read_text())["test"]["acc_mean"] for p in sweep.rglob("results.json")]
    assert float(rows[0]["acc_mean"]) == pytest.approx(100 * sum(accs) / 2, abs=0.01)
    assert "protonet" in table.stdout
