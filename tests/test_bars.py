"""Progress bars redraw ten times a second where someone watches them, and every 30 seconds into a log file."""

from __future__ import annotations

import io

from fewshot import bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_into_a_file_redraws_every_30_seconds(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    into_file, live = bars.tqdm(total=3, file=io.StringIO()), bars.tqdm(total=3, file=Terminal())
    assert (into_file.mininterval, live.mininterval) == (bars.FILE_INTERVAL_S, 0.1)  # 0.1: tqdm's default
    assert bars.tqdm(total=3, file=io.StringIO(), mininterval=2).mininterval == 2  # a bar's own choice stands
    monkeypatch.setenv("TQDM_MININTERVAL", "5")  # tqdm's own setting (read when tqdm is imported) is left to it
    assert bars.tqdm(total=3, file=io.StringIO()).mininterval != bars.FILE_INTERVAL_S


def _redraws(bar_class, **kwargs) -> int:
    """Redraws into a file of 300 updates a second apart (a clock that moves a second per reading)."""
    stream, clock = io.StringIO(), iter(range(10**6))
    with bar_class(total=300, file=stream, **kwargs) as bar:
        bar._time = lambda: bar.start_t + next(clock)
        for _ in range(300):
            bar.update()
    return stream.getvalue().count("\r")


def test_a_bar_into_a_file_writes_a_line_per_30_seconds(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    ours, tqdms = _redraws(bars.tqdm), _redraws(bars._tqdm)
    assert ours <= 300 / 30 + 3 and tqdms >= 250, (ours, tqdms)  # tqdm's default: a redraw per update here
    assert hasattr(bars.tqdm, "write")  # loop.py's validation lines go through it
