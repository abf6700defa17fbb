"""`pip install .` must give a working tool: build the wheel, install it into a fresh folder, run it from there.

The editable install used by `make install` hides a wheel that lacks subpackages (the source tree is on the path),
so this test puts nothing of the checkout on the path: the wheel's own files must be enough."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("fewshot/algorithms/", "fewshot/data/", "fewshot/models/", "fewshot/conf/algo/")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    # From a copy of the sources alone: a build/ folder left by an earlier build would hide missing packages.
    src = tmp_path_factory.mktemp("src") / "fewshot"
    skip = {".git", ".venv", "build", "outputs", "multirun", "data", ".cache", ".whl", ".devdata"}
    shutil.copytree(
        REPO,
        src,
        ignore=lambda folder, names: [
            n for n in names if (Path(folder) == REPO and n in skip) or n.endswith(".egg-info") or n == "__pycache__"
        ],
    )
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    (path,) = out.glob("fewshot-*.whl")
    return path


def test_wheel_holds_every_subpackage(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for sub in SUBPACKAGES:
        assert any(n.startswith(sub) for n in names), f"{sub} missing from {wheel.name}"
    assert "fewshot/conf/experiment/maml_omniglot_5w1s.yaml" in names
    assert "fewshot/conf/budget/smoke.yaml" in names  # optional in train.yaml: its absence would pass unseen


def test_installed_wheel_runs_without_the_checkout(wheel, tmp_path):
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target", str(site), str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "work"
    work.mkdir()
    # The wheel's folder, then the dependencies' site-packages, and the checkout nowhere: -S skips the .pth files
    # (the editable install's finder would serve fewshot's modules from src/), -P the working folder.
    deps = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *deps]), "HYDRA_FULL_ERROR": "1"}
    where = subprocess.run(
        [
            sys.executable,
            "-S",
            "-P",
            "-c",
            "import sys, fewshot, fewshot.algorithms, fewshot.data, "
            "fewshot.models; print(fewshot.__file__); print(any(p.endswith('/src') for p in sys.path))",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.returncode == 0, where.stderr
    file, src_on_path = where.stdout.split()
    assert Path(file).is_relative_to(site) and src_on_path == "False"

    script = site / "bin" / "fewshot-train"
    assert script.is_file(), "the wheel installs no fewshot-train script"
    helped = subprocess.run(
        [sys.executable, "-S", "-P", str(script), "--help"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert helped.returncode == 0, helped.stderr
    assert "algo: " in helped.stdout and "maml" in helped.stdout  # the packaged config tree's groups

    run = subprocess.run(
        [
            sys.executable,
            "-S",
            "-P",
            str(script),
            "dataset=synthetic",
            "trainer=smoke",
            "device=cpu",
            "trainer.iterations=1",
            "trainer.val_episodes=4",
            "eval.episodes=4",
            "backbone.hidden=8",
            "hydra.run.dir=run",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (work / "run" / "results.json").is_file()
