"""Atomic file writes: a reader (or a resumed run) never sees a half-written file. No torch import, so
light commands such as fewshot-table use it too."""

from __future__ import annotations

import fnmatch
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Optional

# atomic_write's temporaries: mkstemp's ".<target name>.<8 random characters>.tmp" beside the target.
TEMPORARY = re.compile(r"\.(?P<target>.+)\.[a-z0-9_]{8}\.tmp")


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
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None:
            # write() and fsync() name no file, and the rename names the temporary: name the file being written.
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: Path | str, *targets: str, older_than: Optional[float] = None) -> list[Path]:
    """Delete the atomic_write temporaries that killed writers (SIGKILL, power loss) left in `folder`; return them.

    targets: globs on the name of the file each was to become (e.g. "*.pt"; none given: any name).
    older_than: only those unmodified for that many seconds, for a folder that other live processes may be writing
    to (a writer keeps its temporary's mtime fresh until it renames it); None removes every one, for a folder that
    no other process writes (a locked run folder). The temporaries' names hold no pid, so age is the only test."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no folder yet (nothing to clean) or unreadable: never a reason to fail a run
        return removed
    now = time.time()
    for entry in entries:
        match = TEMPORARY.fullmatch(entry.name)
        if not match or not any(fnmatch.fnmatchcase(match["target"], t) for t in targets or ("*",)):
            continue
        try:
            if not entry.is_file(follow_symlinks=False):
                continue
            if older_than is not None and now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            os.unlink(entry.path)
        except OSError:  # renamed into place or removed by another process meanwhile
            continue
        removed.append(Path(entry.path))
    return removed
