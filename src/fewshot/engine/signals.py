"""SIGTERM and SIGINT (how clusters preempt): stop at a clean point, checkpoint, and say how to resume."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional

from fewshot.errors import FewshotError

# Set by fewshot-train's Hydra job (fewshot.train._job) in every process that runs one (the command's, or a joblib
# or SLURM worker's), which exits right after an interrupted run: there one more Ctrl-C on the way out must not
# end in a traceback. A Python caller of fewshot.train.run gets its own handlers back.
_ignore_after_interrupt = False


def leave_signals_ignored_after_interrupt() -> None:
    """Record that this process exits after an interrupted run, so stop_on_signals then leaves SIGTERM and SIGINT
    ignored instead of restoring the handlers it found."""
    global _ignore_after_interrupt
    _ignore_after_interrupt = True


class Interrupted(FewshotError):
    """SIGTERM/SIGINT arrived; a checkpoint was written and the run can be resumed."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class SignalGuard:
    """What SIGTERM/SIGINT do at each stage of a run.

    In the training loop the first signal is only recorded (`received`): the loop finishes its iteration,
    checkpoints and raises Interrupted. Where there is nothing to save (preparing data, the final test),
    `immediate` holds the rest of the message and the signal stops the run at once. A second signal stops it at
    once too, naming the last checkpoint written (`last_checkpoint`) instead of writing a new one mid-step."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.immediate: Optional[str] = None
        self.last_checkpoint: str = "no checkpoint was written yet"

    def __bool__(self) -> bool:
        return bool(self.received)

    def handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.immediate is not None:
            raise Interrupted(f"{name} {self.immediate}", signum)
        if self.received:
            raise Interrupted(
                f"second {name}: stopped at once without a new checkpoint; {self.last_checkpoint}", signum
            )
        self.received.append(signum)


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGTERM and SIGINT (how clusters preempt) into a SignalGuard the run consults, so it stops at a clean
    point and checkpoints instead of dying mid-step."""
    guard = SignalGuard()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield guard
        return
    previous = {s: signal.signal(s, guard.handler) for s in (signal.SIGTERM, signal.SIGINT)}
    stopping = False
    try:
        yield guard
    except Interrupted:
        stopping = True
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_IGN if stopping and _ignore_after_interrupt else h)
