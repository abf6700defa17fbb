"""Progress bars (tqdm) that suit where they are shown: redrawn ten times a second in a terminal or a notebook, and
at most once every 30 seconds into a file or a pipe (a cluster job's log, `... > run.log`), where every redraw is
another line kept on disk: a day-long run at ten a second leaves hundreds of megabytes of them. TQDM_MININTERVAL,
tqdm's own setting, or a bar's own mininterval still decides where given."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as _tqdm

FILE_INTERVAL_S = 30.0  # seconds between redraws where the bar is not shown live


def _live(stream) -> bool:
    """Whether `stream` shows a bar as it is redrawn: a terminal, or a notebook's widget (tqdm.auto's pick there)."""
    if "notebook" in _tqdm.__module__:
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class tqdm(_tqdm):  # noqa: N801  (tqdm's own name, so call sites read as usual)
    """tqdm.auto.tqdm, redrawn every FILE_INTERVAL_S seconds where its stream is not a terminal."""

    def __init__(self, *args, **kwargs) -> None:
        if "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ:
            if not _live(kwargs.get("file") or sys.stderr):
                kwargs["mininterval"] = FILE_INTERVAL_S
        super().__init__(*args, **kwargs)
