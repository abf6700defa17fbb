"""One process per run folder: an exclusive flock on <run folder>/.lock for the run's whole life.

The kernel drops the lock when the holder exits, however it exits (SIGKILL and out-of-memory kills included), so
a stale lock never blocks a resume; the file stays behind and is simply locked again by the next run."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Iterator

from fewshot.errors import FewshotError

LOCK_NAME = ".lock"


class RunFolderInUse(FewshotError):
    """Another live process holds the run folder."""


def _holder(fd: int) -> str:
    """'<prog> (pid N)' from the lock file; the holder writes it right after locking, so retry briefly."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if len(text) >= 2 and text[0].isdigit():
            return f"{text[1]} (pid {text[0]})"
        time.sleep(0.01)
    return "process (pid unknown)"


@contextlib.contextmanager
def hold_run_folder(run_dir: Path | str, prog: str = "fewshot-train") -> Iterator[Path]:
    """Hold run_dir exclusively until the block ends; raise RunFolderInUse (naming the holder) if it is taken.

    Take it before anything is read from or written to the folder."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # close-on-exec: a child that execs does not keep the lock
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderInUse(
                f"run folder {run_dir} is in use by another {_holder(fd)}; wait for it or choose another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {prog}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the flock
