"""RQ's job timeout as levers' worker arms it: SIGALRM, its handler installed once per process."""

from __future__ import annotations

import _signal
import signal
from types import FrameType
from typing import ClassVar

from rq.timeouts import UnixSignalDeathPenalty


class JobTimeout(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, with its signal handler installed once and kept: RQ installs and
    removes it around every job, and each ``signal.signal`` call costs tens of microseconds in a
    worker that runs threads. It is installed again if other code replaced it.

    The check reads the handler with ``_signal.getsignal``: ``signal.getsignal`` first tries to
    turn it into an enum member, which for a Python function fails through an exception, about
    100 µs between two handlers.
    """

    _armed: ClassVar[JobTimeout | None] = None

    def setup_death_penalty(self) -> None:
        if _signal.getsignal(signal.SIGALRM) is not JobTimeout._on_alarm:
            signal.signal(signal.SIGALRM, JobTimeout._on_alarm)
        JobTimeout._armed = self
        signal.alarm(self._timeout)

    def cancel_death_penalty(self) -> None:
        signal.alarm(0)
        JobTimeout._armed = None

    @staticmethod
    def _on_alarm(signum: int, frame: FrameType | None) -> None:
        armed = JobTimeout._armed
        if armed is not None:  # else it struck just as its job ended
            armed.handle_death_penalty(signum, frame)
