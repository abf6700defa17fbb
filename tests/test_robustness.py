"""Runs that survive: kill and resume, SIGTERM checkpoints, safe and atomic checkpoints, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fewshot import engine
from fewshot.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fewshot.train import run as train_run

BIN = Path(sys.executable).parent
RUN = [
    "algo=maml",
    "dataset=synthetic",
    "device=cpu",
    "backbone.hidden=8",
    "trainer.meta_batch_size=4",
    "trainer.iterations=24",
    "trainer.val_every=8",
    "trainer.val_episodes=8",
    "trainer.checkpoint_every=1",
    "eval.episodes=16",
    "eval.meta_batch_size=8",
    "episode.queries=3",
    "seed=1",
]


def start(tmp: Path, run_dir: str, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [str(BIN / "fewshot-train"), *RUN, f"hydra.run.dir={run_dir}", *extra],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out + err


def wait_for_iteration(run: Path, iteration: int, proc: subprocess.Popen) -> None:
    last = run / "checkpoints" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        assert proc.poll() is None, f"run ended before iteration {iteration}: {proc.stderr.read()[-2000:]}"
        if last.exists():
            try:
                if load_checkpoint(last)["iteration"] >= iteration:
                    return
            except CheckpointError:
                pass  # replaced under our feet; look again
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at iteration {iteration} within 300 s")


def final_state(run: Path) -> tuple[dict, dict]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"], json.loads((run / "results.json").read_text())[
        "test"
    ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same run, left alone."""
    tmp = tmp_path_factory.mktemp("reference")
    code, err = finish(start(tmp, "run"))
    assert code == 0, err[-3000:]
    return final_state(tmp / "run")


def assert_same(run: Path, reference) -> None:
    weights, test = final_state(run)
    ref_weights, ref_test = reference
    assert weights.keys() == ref_weights.keys()
    for k in weights:
        assert torch.equal(weights[k], ref_weights[k]), f"{k} differs after resume"
    assert test == ref_test


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3, 8, 17])  # early, right at a validation, between validations
def test_sigkill_then_resume_is_bitwise_identical(tmp_path, reference, kill_at):
    proc = start(tmp_path, "run")
    wait_for_iteration(tmp_path / "run", kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    code, err = finish(start(tmp_path, "run"))  # same command, same folder: resumes by itself
    assert code == 0, err[-3000:]
    assert "resuming" in err
    assert_same(tmp_path / "run", reference)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["8", "16", "24"]  # no duplicated or half-written rows


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_nonzero_then_resumes(tmp_path, reference):
    proc = start(tmp_path, "run")
    wait_for_iteration(tmp_path / "run", 5, proc)
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 128 + signal.SIGTERM
    assert "SIGTERM at iteration" in err and "checkpoints/last.pt" in err
    assert "Traceback" not in err
    stopped_at = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["iteration"]
    assert 5 <= stopped_at < 24
    code, err = finish(start(tmp_path, "run", "resume=true"))
    assert code == 0, err[-3000:]
    assert_same(tmp_path / "run", reference)


def test_resume_true_without_checkpoint_is_an_error(compose_cfg, tmp_path):
    cfg = compose_cfg("train", RUN + ["resume=true"])
    with pytest.raises(CheckpointError, match="holds no last.pt"):
        train_run(cfg, tmp_path / "fresh")


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {Exploit.target}",))


def test_crafted_pickle_is_refused_without_running(tmp_path):
    Exploit.target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "fewshot-checkpoint-v1", "model": Exploit()}, path)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not Exploit.target.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:  # a bare pickle, not even a torch zip
        pickle.dump(Exploit(), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not Exploit.target.exists()


def test_truncated_checkpoint_names_the_file_and_resume_falls_back(compose_cfg, tmp_path):
    cfg = compose_cfg("train", RUN[:-1] + ["trainer.iterations=4", "trainer.val_every=2", "seed=2"])
    train_run(cfg, tmp_path)
    last = tmp_path / "checkpoints" / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(last)
    state = engine.find_resume_checkpoint(tmp_path / "checkpoints")  # previous.pt is still good
    assert state["iteration"] == 3


def test_interrupted_write_keeps_previous_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"iteration": 1})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"iteration": 2, "x": Boom()})
    assert load_checkpoint(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(compose_cfg, tmp_path):
    cfg = compose_cfg("train", RUN + ["algo.inner_lr=1e30", "trainer.iterations=3"])
    with pytest.raises(Exception, match=r"training loss became (nan|inf) at iteration 1"):
        train_run(cfg, tmp_path)


# ---- bad input: one line on stderr, non-zero exit, no traceback --------------------------------------

BAD_INPUTS = [
    (["algo=nope"], "available options in 'algo': anil fomaml lstm_baseline maml"),
    (["dataset=nope"], "available options in 'dataset'"),
    (["backbone=nope"], "available options in 'backbone'"),
    (["dataset=synthetic", "episode.ways=80"], "episode.ways=80 exceeds the 64 classes of the train split"),
    (["dataset=synthetic", "episode.shots=10", "episode.queries=15"], "exceeds the 20 images per class"),
    (["dataset=synthetic", "episode.ways=0"], "episode.ways=0: must be a positive number"),
    (["dataset=synthetic", "episode.shots=-1"], "episode.shots=-1: must be a positive number"),
    (["dataset=synthetic", "episode.queries=0"], "episode.queries=0: must be a positive number"),
    (["dataset=synthetic", "algo.inner_steps=0"], "algo.inner_steps=0: must be a positive number"),
    (["dataset=synthetic", "algo.inner_lr=-0.1"], "algo.inner_lr=-0.1: must be a positive number"),
    (["dataset=synthetic", "trainer.meta_lr=0"], "trainer.meta_lr=0.0: must be a positive number"),
    (["dataset=synthetic", "trainer.iterations=0"], "trainer.iterations=0: must be a positive number"),
    (["trainer.iteratons=5"], "Key 'iteratons' not in 'TrainerConfig'"),
    (["seed=abc"], "could not be converted to Integer"),
]


def run_cli(tmp_path: Path, prog: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), **(env or {})}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([str(BIN / prog), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "no CUDA device found" not in ln]
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_gives_one_line(tmp_path, args, message):
    line = error_line(run_cli(tmp_path, "fewshot-train", *args, "dry_run=true"))
    assert line.startswith("fewshot-train: error: ") and message in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda(tmp_path):
    line = error_line(run_cli(tmp_path, "fewshot-train", "dataset=synthetic", "device=cuda", "dry_run=true"))
    assert "device=cuda but no CUDA device is available; use device=cpu or device=auto" in line
    auto = run_cli(tmp_path, "fewshot-train", "dataset=synthetic", "device=auto", "dry_run=true")
    assert auto.returncode == 0 and "running on CPU (device=auto)" in auto.stderr


def test_missing_data_and_no_network(tmp_path):
    line = error_line(
        run_cli(
            tmp_path,
            "fewshot-train",
            f"data_root={tmp_path / 'nodata'}",
            "dataset.base_url=http://127.0.0.1:9",
            "dry_run=true",
        )
    )
    assert str(tmp_path / "nodata" / "omniglot") in line and "images_background.zip" in line


def test_zip_with_wrong_content(tmp_path):
    import zipfile

    root = tmp_path / "data" / "omniglot"
    root.mkdir(parents=True)
    for name in ("images_background.zip", "images_evaluation.zip"):
        with zipfile.ZipFile(root / name, "w") as z:
            z.writestr(f"{name[:-4]}/Alphabet/character01/0001_01.png", b"not a png")
    line = error_line(run_cli(tmp_path, "fewshot-train", f"data_root={tmp_path / 'data'}", "dry_run=true"))
    assert "omniglot" in line.lower() and "1623" in line


def test_eval_checkpoint_from_another_algorithm(tmp_path, compose_cfg):
    cfg = compose_cfg("train", RUN[:-1] + ["algo=protonet", "trainer.iterations=2", "trainer.val_every=2"])
    train_run(cfg, tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "best.pt"
    line = error_line(run_cli(tmp_path, "fewshot-eval", f"checkpoint={ckpt}", "algo=maml"))
    assert "protonet" in line and "maml" in line
    line = error_line(run_cli(tmp_path, "fewshot-eval", f"checkpoint={tmp_path / 'missing.pt'}"))
    assert "missing.pt does not exist" in line


def test_eval_without_a_checkpoint(tmp_path):
    # checkpoint is ??? in conf/eval.yaml: omegaconf's MissingMandatoryValue traceback came out before the check
    line = error_line(run_cli(tmp_path, "fewshot-eval"))
    assert line == "fewshot-eval: error: checkpoint is not set: pass checkpoint=outputs/<run>/checkpoints/best.pt"
    assert not (tmp_path / "outputs").exists()  # refused before Hydra made a run folder
    # swept over, it is set in each job: the jobs run (and fail on their missing files, one by one)
    sweep = run_cli(tmp_path, "fewshot-eval", "-m", "checkpoint=a.pt,b.pt")
    assert "is not set" not in sweep.stderr and sweep.stderr.count("does not exist") == 4, sweep.stderr
    # the check resolves nothing: an interpolation only a running job can resolve passes it
    ok = run_cli(tmp_path, "fewshot-train", "dataset=synthetic", "data_root=${hydra:runtime.cwd}/data", "dry_run=true")
    assert ok.returncode == 0 and "data_root: ${hydra:runtime.cwd}/data" in ok.stdout, ok.stderr


def test_resume_refuses_a_folder_with_other_settings(compose_cfg, tmp_path):
    base = RUN[:-1] + ["algo=protonet", "trainer.iterations=2", "trainer.val_every=2"]
    train_run(compose_cfg("train", base), tmp_path)
    with pytest.raises(CheckpointError, match=r"other settings \(episode.shots: 1 -> 2"):
        train_run(compose_cfg("train", base + ["episode.shots=2"]), tmp_path)
    with pytest.raises(CheckpointError, match="already at iteration 2"):
        train_run(compose_cfg("train", base[:-2] + ["trainer.iterations=1", "trainer.val_every=1"]), tmp_path)
    longer = train_run(compose_cfg("train", base[:-2] + ["trainer.iterations=4", "trainer.val_every=2"]), tmp_path)
    assert longer["iterations"] == 4  # training longer continues the same run


@pytest.mark.slow
def test_sigterm_under_multirun_then_rerun_resumes(tmp_path, reference):
    """A preempted sweep: the same multirun command with the same sweep folder resumes the stopped job."""
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [str(BIN / "fewshot-train"), "-m", *RUN[:-1], "seed=1,2", "hydra.sweep.dir=sweep"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    job0 = tmp_path / "sweep" / "0_maml_synthetic_5w1s_seed1"
    wait_for_iteration(job0, 5, proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 128 + signal.SIGTERM and "SIGTERM at iteration" in out
    code, out = finish(
        subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    )
    assert code == 0, out[-3000:]
    assert "resuming" in out
    assert_same(job0, reference)  # job 0 is the reference run (seed 1) interrupted and resumed
    assert (tmp_path / "sweep" / "1_maml_synthetic_5w1s_seed2" / "results.json").is_file()
