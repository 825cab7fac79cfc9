"""The supervisor's heartbeat in a file, for a liveness probe that needs neither Redis nor HTTP.

The supervisor touches the file on every pass of its loop, ticks and outage waits alike, so the
file's age says whether the loop runs: a probe that reads it restarts a hung supervisor, but not
one waiting out a Redis outage (every container of the pipeline would be restarted at once, and
their running jobs with them). The file is removed at the start, so a heartbeat left by an
earlier run in the same directory never vouches for a supervisor still importing its handlers.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from levers.errors import UsageError

log = logging.getLogger("levers.supervisor.reconcile")

# At most one touch a second: a tick runs every 0.25 s, and a probe reads the age in seconds.
BEAT_EVERY_S = 1.0


class HealthFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise UsageError(
                f"cannot use {path} as the health file: {exc.strerror or exc}",
                fix="give --health-file a path in a writable directory",
            ) from None
        if not os.access(path.parent, os.W_OK):
            raise UsageError(
                f"cannot write the health file {path}: its directory is not writable",
                fix="give --health-file a path in a writable directory",
            )
        self._last = float("-inf")
        self._failing = False

    def beat(self) -> None:
        """Touch the file, unless it was touched less than a second ago."""
        now = time.monotonic()
        if now - self._last < BEAT_EVERY_S:
            return
        self._last = now
        try:
            self.path.touch()
        except OSError as exc:  # said once: the probe restarts the supervisor if it lasts
            if not self._failing:
                log.warning("cannot touch the health file %s: %s", self.path, exc.strerror or exc)
            self._failing = True
            return
        self._failing = False
