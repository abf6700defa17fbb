"""Progress bars (tqdm) that suit where they are shown: redrawn ten times a second in a terminal or a notebook, and
at most once every 30 seconds into a file or a pipe (a cluster job's log, `... > run.log`), where every redraw is
another line kept on disk: at ten a second a day-long run leaves over 100 MB of them. TQDM_MININTERVAL, tqdm's own
setting (read when tqdm is imported), or a bar's own mininterval still decides where given."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm as _tqdm

FILE_INTERVAL_S = 30.0  # seconds between redraws where the bar is not shown live

# tqdm.auto's class mixes in tqdm.notebook's in a Jupyter kernel (whose streams are no terminals, yet show live bars)
_NOTEBOOK = any(c.__module__ == "tqdm.notebook" for c in _tqdm.__mro__)


def _live(stream) -> bool:
    """Whether `stream` shows a bar as it is redrawn: a terminal, or a notebook's widget."""
    isatty = getattr(stream, "isatty", None)
    return _NOTEBOOK or bool(isatty and isatty())


class tqdm(_tqdm):  # noqa: N801  (tqdm's own name, so call sites read as usual)
    """tqdm.auto.tqdm, redrawn every FILE_INTERVAL_S seconds where its stream is not a terminal. There it also checks
    the time at every update (miniters=1): tqdm's dynamic miniters would let its monitor thread force a redraw every
    maxinterval (10 s) between the timed ones."""

    def __init__(self, *args, **kwargs) -> None:
        if "mininterval" not in kwargs and "TQDM_MININTERVAL" not in os.environ:
            if not _live(kwargs.get("file") or sys.stderr):
                kwargs.update(mininterval=FILE_INTERVAL_S, miniters=kwargs.get("miniters") or 1)
        super().__init__(*args, **kwargs)
