"""Progress bars redraw ten times a second where someone watches them, and every 30 seconds into a log file."""

from __future__ import annotations

import io

from fewshot import bars


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_bar_into_a_file_redraws_every_30_seconds(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    tqdms = bars._tqdm(total=3, file=io.StringIO()).mininterval  # tqdm's own default (or an exported setting)
    into_file, live = bars.tqdm(total=3, file=io.StringIO()), bars.tqdm(total=3, file=Terminal())
    assert (into_file.mininterval, into_file.miniters) == (bars.FILE_INTERVAL_S, 1)
    assert live.mininterval == tqdms != bars.FILE_INTERVAL_S
    assert bars.tqdm(total=3, file=io.StringIO(), mininterval=2).mininterval == 2  # a bar's own choice stands
    monkeypatch.setenv("TQDM_MININTERVAL", "5")  # tqdm reads its own setting when imported: ours steps aside
    assert bars.tqdm(total=3, file=io.StringIO()).mininterval == tqdms


def _redraws(bar_class, updates: int = 300) -> int:
    """Redraws into a file of `updates` updates, one simulated second apart."""
    stream, now = io.StringIO(), [0]
    with bar_class(total=updates, file=stream) as bar:
        bar._time = lambda: bar.start_t + now[0]  # the clock tqdm's update() reads
        for _ in range(updates):
            now[0] += 1
            bar.update()
    return stream.getvalue().count("\r")


def test_a_bar_into_a_file_writes_a_line_per_30_seconds(monkeypatch):
    monkeypatch.delenv("TQDM_MININTERVAL", raising=False)
    ours, tqdms = _redraws(bars.tqdm), _redraws(bars._tqdm)
    assert 300 / 30 <= ours <= 300 / 30 + 3 and tqdms >= 250, (ours, tqdms)  # tqdm's default: about every update
