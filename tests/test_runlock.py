"""A run owns its folder: a second run on it stops, a killed run's lock is taken over, seeds get their own folders,
and killed writes leave no temporaries behind for good."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from fewshot.atomic import remove_stale_temporaries
from fewshot.data.io.cache import STALE_TEMPORARY_SECONDS, read_cache
from fewshot.eval import run as eval_run
from fewshot.runlock import RunFolderInUse, hold_run_folder
from fewshot.train import run as train_run
from test_robustness import RUN, error_line, finish, run_cli, start, wait_for_iteration


def snapshot(run: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of the run's files, .hydra/ included (written only under the lock); Hydra's job log aside."""
    return {
        str(p.relative_to(run)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.suffix != ".log"
    }


def test_second_run_on_a_busy_folder_stops_with_one_line_and_the_first_finishes(tmp_path):
    first = start(tmp_path, "run")
    try:
        wait_for_iteration(tmp_path / "run", 2, first)
        first.send_signal(signal.SIGSTOP)  # a paused holder keeps its lock: the overlap is certain, not a race
        before = snapshot(tmp_path / "run")
        second = run_cli(tmp_path, "fewshot-train", *RUN, "hydra.run.dir=run")
        assert second.returncode == 2
        line = error_line(second)
        assert line == (
            f"fewshot-train: error: run folder {tmp_path / 'run'} is in use by another fewshot-train "
            f"(pid {first.pid}); wait for it or choose another hydra.run.dir"
        ), line
        assert snapshot(tmp_path / "run") == before  # refused before reading or writing anything of the run
    finally:
        first.send_signal(signal.SIGCONT)
    code, out = finish(first)
    assert code == 0, out[-3000:]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["8", "16", "24"]
    assert all(len(r.split(",")) == len(rows[0].split(",")) for r in rows)
    assert (tmp_path / "run" / "results.json").is_file()


def test_lock_of_a_killed_run_is_taken_over(tmp_path):
    first = start(tmp_path, "run")
    wait_for_iteration(tmp_path / "run", 3, first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    lock = tmp_path / "run" / ".lock"
    assert lock.read_text().split() == [str(first.pid), "fewshot-train"]  # the dead holder's record stays behind
    again = start(tmp_path, "run")
    code, out = finish(again)
    assert code == 0, out[-3000:]
    assert "resuming" in out and "in use" not in out
    assert lock.read_text().split() == [str(again.pid), "fewshot-train"]


def test_lock_is_exclusive_and_released_on_any_exit(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with hold_run_folder(tmp_path, "fewshot-train"):
            with pytest.raises(RunFolderInUse, match=rf"in use by another fewshot-train \(pid {os.getpid()}\)"):
                with hold_run_folder(tmp_path, "fewshot-eval"):
                    pass
            raise RuntimeError("boom")
    with hold_run_folder(tmp_path, "fewshot-eval"):  # released by the exception: free again
        assert (tmp_path / ".lock").read_text().split() == [str(os.getpid()), "fewshot-eval"]


def test_train_and_eval_refuse_a_held_folder(compose_cfg, tmp_path):
    with hold_run_folder(tmp_path, "fewshot-train"):
        with pytest.raises(RunFolderInUse, match="wait for it or choose another hydra.run.dir"):
            train_run(compose_cfg("train", RUN), tmp_path)
        with pytest.raises(RunFolderInUse):
            eval_run(compose_cfg("eval", [f"checkpoint={tmp_path / 'best.pt'}"]), tmp_path)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.csv").exists()


def test_default_run_folders_of_two_seeds_differ(compose_cfg):
    def run_dir(seed: int) -> str:
        cfg = compose_cfg("train", ["dataset=synthetic", f"seed={seed}"], return_hydra_config=True)
        # The timestamp is to the second: seeds started together share it, so only the rest can tell them apart.
        return re.sub(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d", "<now>", cfg.hydra.run.dir)

    assert run_dir(0) != run_dir(1)
    assert run_dir(3) == "outputs/maml_synthetic_5w1s/<now>_seed3"


def test_killed_writers_temporaries_in_the_run_folder_are_removed_at_start(compose_cfg, tmp_path):
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    stale = [ckpt / ".last.pt.a1b2c3d4.tmp", ckpt / ".best.pt.z_9y8x7w.tmp", tmp_path / ".metrics.csv.qwertyui.tmp"]
    kept = [ckpt / "notes.tmp", tmp_path / ".mine.txt.abcdefgh.tmp"]  # not ours / not a file the run writes
    for p in stale + kept:
        p.write_bytes(b"half a file")
    train_run(compose_cfg("train", RUN[:-1] + ["trainer.iterations=2", "trainer.val_every=2", "seed=3"]), tmp_path)
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in kept)
    assert (ckpt / "last.pt").is_file() and (tmp_path / "results.json").is_file()


def test_cache_temporaries_are_removed_only_when_stale(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    old = time.time() - STALE_TEMPORARY_SECONDS - 60
    dead = cache / ".omniglot_0123abcd.pt.k3j4h5g6.tmp"  # a killed write, untouched for over 10 minutes
    live = cache / ".omniglot_4567ef01.pt.m8n7b6v5.tmp"  # another process writing its cache right now
    other = cache / ".notes.txt.aaaaaaaa.tmp"  # not a cache file
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    os.utime(dead, (old, old))
    os.utime(other, (old, old))
    assert read_cache(cache / "omniglot_0123abcd.pt", "fp", 1, "Omniglot", lambda d: True) is None
    assert not dead.exists() and live.exists() and other.exists()
    assert remove_stale_temporaries(cache / "missing") == []  # no cache folder yet: nothing to do, no error
