"""Sweeps: launcher and search configs compose; a real joblib multirun yields a table with seeds pooled."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
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
    cfg = compose_cfg(
        "train", ["hparams_search=maml_omniglot_optuna", "experiment=maml_omniglot_5w1s"], return_hydra_config=True
    )
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert set(sweeper.params) == {"algo.inner_lr", "trainer.meta_lr"}


@pytest.mark.slow
def test_joblib_multirun_two_seeds_pooled_in_table(tmp_path):
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    sweep = tmp_path / "sweep"
    cmd = [
        str(BIN / "fewshot-train"),
        "-m",
        "launcher=joblib",
        "algo=protonet",
        "dataset=synthetic",
        "device=cpu",
        "backbone.hidden=16",
        "trainer=smoke",
        "trainer.iterations=6",
        "trainer.val_every=3",
        "eval.episodes=20",
        "episode.queries=5",
        "seed=0,1",
        f"hydra.sweep.dir={sweep}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.parent.name for p in sweep.rglob("results.json"))
    assert len(jobs) == 2 and all(j.split("_")[0] in ("0", "1") for j in jobs), jobs  # numbered job folders
    seeds = sorted(json.loads(p.read_text())["seed"] for p in sweep.rglob("results.json"))
    assert seeds == [0, 1]
    assert all((p.parent / "learning_curve.png").is_file() for p in sweep.rglob("results.json"))

    out_csv = tmp_path / "table.csv"
    table = subprocess.run(
        [str(BIN / "fewshot-table"), str(sweep), "--csv", str(out_csv)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(open(out_csv)))
    assert len(rows) == 1 and int(rows[0]["n_seeds"]) == 2
    accs = [json.loads(p.read_text())["test"]["acc_mean"] for p in sweep.rglob("results.json")]
    assert float(rows[0]["acc_mean"]) == pytest.approx(100 * sum(accs) / 2, abs=0.01)
    assert "protonet" in table.stdout


# ---- a sweep goes on past a failed job, and tells how to resume after a preemption (issue 11) -----------------

FAST = [
    "dataset=synthetic",
    "device=cpu",
    "trainer=smoke",
    "backbone.hidden=8",
    "trainer.iterations=2",
    "trainer.val_every=2",
    "trainer.val_episodes=4",
    "eval.episodes=4",
    "episode.queries=3",
]


def sweep_env(tmp_path: Path) -> dict:
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def stderr_lines(stderr: str) -> list[str]:
    """stderr's lines without tqdm's progress bars."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stderr.replace("\r", "\n"))
    return [ln for ln in text.splitlines() if ln.strip() and "it/s" not in ln and "task/s" not in ln]


def run_sweep(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fewshot-train"), "-m", *FAST, *args, "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        env=sweep_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ("episode.ways=80", "episode.ways=80 exceeds the 64 classes of the train split"),  # fails in the job
        ("episode.ways=five", "Value 'five' of type 'str' could not be converted to Integer"),  # fails to compose
    ],
)
def test_failed_job_is_one_line_and_the_sweep_goes_on(tmp_path, bad, message):
    proc = run_sweep(tmp_path, f"{bad.split('=')[0]}={bad.split('=')[1]},5")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep as a whole failed
    assert "Traceback" not in proc.stderr and "full_key" not in proc.stderr
    lines = stderr_lines(proc.stderr)
    failed = [ln for ln in lines if ln.startswith("fewshot-train: job #0")]
    assert len(failed) == 1 and failed[0].startswith(f"fewshot-train: job #0 ({bad}) failed: ")
    assert message in failed[0]
    # job #1 ran anyway, under its own number
    assert (tmp_path / "sweep" / "1_maml_synthetic_5w1s_seed0" / "results.json").is_file()
    assert lines[-2:] == [
        f"fewshot-train: 1 job of the sweep failed (listed in {Path('sweep', 'failed_jobs.txt')}):",
        f"fewshot-train:   #0 ({bad}): {failed[0].split(' failed: ', 1)[1]}",
    ]
    assert (tmp_path / "sweep" / "failed_jobs.txt").read_text().splitlines() == [lines[-1].split("   ", 1)[1]]


def test_sweep_without_failures_exits_0_and_forgets_earlier_failures(tmp_path):
    assert run_sweep(tmp_path, "episode.ways=80").returncode == 1
    proc = run_sweep(tmp_path, "episode.ways=5")  # the same sweep folder, nothing failing this time
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (tmp_path / "sweep" / "failed_jobs.txt").exists() and "failed" not in proc.stderr


@pytest.mark.slow
def test_sigterm_in_a_sweep_prints_the_command_that_resumes_it(tmp_path):
    """The engine's hint (hydra.run.dir=<job folder>) would start a new sweep: the printed command resumes this one."""
    from fewshot.checkpoint import CheckpointError, load_checkpoint

    env = sweep_env(tmp_path)
    args = [
        "algo=maml",
        "dataset=synthetic",
        "device=cpu",
        "backbone.hidden=8",
        "trainer.meta_batch_size=4",
        "trainer.iterations=16",
        "trainer.val_every=8",
        "trainer.val_episodes=4",
        "trainer.checkpoint_every=1",
        "eval.episodes=4",
        "episode.queries=3",
        "seed=1,2",
    ]
    proc = subprocess.Popen(
        [str(BIN / "fewshot-train"), "-m", *args, "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = tmp_path / "sweep" / "0_maml_synthetic_5w1s_seed1" / "checkpoints" / "last.pt"
    deadline = time.time() + 120
    while True:  # job #0 is training
        assert proc.poll() is None and time.time() < deadline, "job #0 ended before it could be interrupted"
        try:
            if last.exists() and load_checkpoint(last)["iteration"] >= 2:
                break
        except CheckpointError:
            pass  # replaced under our feet
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    line = [ln for ln in stderr_lines(err) if ln.startswith("fewshot-train: error: SIGTERM")]
    assert len(line) == 1 and "hydra.run.dir" not in line[0], err[-3000:]
    command = line[0].split("; resume the sweep with: ", 1)[1]
    assert command == shlex.join(["fewshot-train", "-m", *args, f"hydra.sweep.dir={tmp_path / 'sweep'}"])

    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    resumed = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr  # job #0 went on from its checkpoint
    assert sorted(p.parent.name for p in (tmp_path / "sweep").rglob("results.json")) == [
        "0_maml_synthetic_5w1s_seed1",
        "1_maml_synthetic_5w1s_seed2",
    ]
    assert not (tmp_path / "outputs").exists()  # no new sweep folder
