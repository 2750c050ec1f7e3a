"""Preemption: SIGTERM/SIGINT set a flag; the loop saves at the next step boundary and exits 0.

The handler only records the signal, so a step is never cut in half; all ranks agree on it
(the flag rides on the step's one agreement all-reduce, see `step.py`). A second SIGINT
aborts at once (an impatient Ctrl-C).
"""

from __future__ import annotations

import signal


_EARLY: list[int] = []
_ACTIVE: list["StopFlag"] = []  # the StopFlag in force (the trainer's), if any


class StoppedInSetup(Exception):
    """A stop signal made set-up impossible to finish (it interrupted a JIT build): every rank
    raises it together, the trainer says it once and exits 0, nothing to save."""


def stop_requested() -> int | None:
    """The stop signal this process received so far (SIGTERM / SIGINT), if any."""
    if _ACTIVE:
        return _ACTIVE[-1].signum
    return _EARLY[0] if _EARLY else None


def catch_early() -> None:
    """Keep a SIGTERM/SIGINT that arrives while the process is still importing and setting up
    (before `StopFlag`), instead of dying of it: `gigamim launch` calls this first thing in a
    pretrain rank, so a preemption during start-up still ends in a checkpoint after step 1."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: _EARLY.append(signum))


class StopFlag:
    def __init__(self):
        self.signum: int | None = _EARLY[0] if _EARLY else None
        self._previous: dict = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.signum is None and _EARLY:  # arrived while we were being built
            self.signum = _EARLY[0]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


class Deadline:
    """`train.stop_after` measured from the start of this process's run."""

    def __init__(self, stop_after):
        import time

        from gigamim.config import parse_duration

        self.seconds = parse_duration(stop_after)
        self.spec = stop_after
        self._end = time.monotonic() + self.seconds if self.seconds else None

    def __bool__(self) -> bool:
        import time

        return self._end is not None and time.monotonic() >= self._end
