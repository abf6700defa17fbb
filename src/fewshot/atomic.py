"""Atomic file writes: a reader (or a resumed run) never sees a half-written file. No torch import, so
light commands such as fewshot-table use it too."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import IO, Callable


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], object]) -> None:
    """Call write(file) on a temporary file beside `path`, fsync it, then rename it into place, so a kill
    during the write leaves the previous good file and never a partial one (nor a stray temporary)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results and caches are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
