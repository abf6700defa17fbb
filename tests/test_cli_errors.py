"""Filesystem errors (issue 11, item 9): a run folder that cannot be created or written, a disk that fills up while
a checkpoint is written. One line on stderr naming the path and the errno's meaning, exit 2; the traceback only
with HYDRA_FULL_ERROR=1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
from test_sweeps import FAST  # noqa: E402  (the same fast run as the sweep tests)

# fewshot-train with a fault injected in-process, for what a test running as root cannot provoke for real:
#   erofs PATH: PATH lies on a read-only file system (creating or writing anything under it fails with EROFS)
#   enospc PATH: the disk fills up while checkpoints/best.pt is written (PATH unused)
FAULTS = r"""
import builtins, errno, io, os, sys
kind, target = sys.argv[1], os.path.abspath(sys.argv[2])
del sys.argv[1:3]
sys.argv[0] = "fewshot-train"


def fail(code, path=None):
    raise OSError(code, os.strerror(code), *([os.fsdecode(path)] if path is not None else []))


def under(path):
    return isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(target)


if kind == "erofs":
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def fake_open(file, mode="r", *args, **kwargs):
        if under(file) and any(c in mode for c in "wax+"):
            fail(errno.EROFS, file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            fail(errno.EROFS, path)
        return real_os_open(path, flags, *args, **kwargs)

    def fake_mkdir(path, *args, **kwargs):
        if under(path) and not os.path.isdir(path):
            fail(errno.EROFS, path)
        return real_mkdir(path, *args, **kwargs)

    builtins.open = io.open = fake_open
    os.open, os.mkdir = fake_os_open, fake_mkdir
elif kind == "enospc":
    import torch

    real_save = torch.save

    def fake_save(obj, f, *args, **kwargs):  # f: atomic_write's temporary, ".best.pt.<random>.tmp"
        if ".best.pt." in os.readlink(f"/proc/self/fd/{f.fileno()}"):
            fail(errno.ENOSPC)  # as write() or fsync() report it: no file name
        return real_save(obj, f, *args, **kwargs)

    torch.save = fake_save

from fewshot.cli import train_main

train_main()
"""


def run(tmp_path: Path, *args: str, fault: tuple[str, Path] | None = None, full_error: bool = False):
    env = {**os.environ, "FEWSHOT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    if fault:
        cmd = [sys.executable, "-c", FAULTS, fault[0], str(fault[1]), *args]
    else:
        cmd = [str(BIN / "fewshot-train"), *args]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line on stderr (progress bars and the CPU notice aside), after exit status 2 and no traceback."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", proc.stderr.replace("\r", "\n"))  # tqdm's cursor moves
    lines = [
        ln
        for ln in text.splitlines()
        if ln.strip() and "no CUDA device found" not in ln and "it/s" not in ln and "task/s" not in ln
    ]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_run_folder_name_too_long(tmp_path):
    name = "a" * 300
    line = error_line(run(tmp_path, *FAST, f"hydra.run.dir={name}"))
    assert line == f"fewshot-train: error: cannot create run folder {name}: File name too long"


def test_run_folder_under_a_file(tmp_path):
    (tmp_path / "some_file").write_text("")
    line = error_line(run(tmp_path, *FAST, "hydra.run.dir=some_file/run"))
    assert line == "fewshot-train: error: cannot create run folder some_file/run: Not a directory"


def test_run_folder_on_a_read_only_file_system(tmp_path):
    (tmp_path / "run").mkdir()  # exists, so creating it succeeds; writing in it does not
    line = error_line(run(tmp_path, *FAST, "hydra.run.dir=run", fault=("erofs", tmp_path / "run")))
    assert line == "fewshot-train: error: cannot write in run folder run: Read-only file system"


def test_disk_full_while_writing_best_checkpoint(tmp_path):
    line = error_line(run(tmp_path, *FAST, "hydra.run.dir=run", fault=("enospc", tmp_path)))
    best = tmp_path / "run" / "checkpoints" / "best.pt"
    assert line == f"fewshot-train: error: cannot write {best}: No space left on device"
    assert not best.exists() and not list(best.parent.glob("*.tmp"))  # nothing half-written left behind


def test_sweep_folder_name_too_long(tmp_path):
    name = "s" * 300
    line = error_line(run(tmp_path, "-m", *FAST, "seed=0,1", f"hydra.sweep.dir={name}"))
    assert line == f"fewshot-train: error: cannot create sweep folder {name}: File name too long"


def test_full_error_still_shows_the_traceback(tmp_path):
    (tmp_path / "some_file").write_text("")
    proc = run(tmp_path, *FAST, "hydra.run.dir=some_file/run", full_error=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "NotADirectoryError" in proc.stderr
    proc = run(tmp_path, *FAST, "hydra.run.dir=run", fault=("enospc", tmp_path), full_error=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "No space left on device" in proc.stderr
