"""Following the published pipeline: a supervisor runs the newest version, whichever host published it.

At its start a supervisor publishes its pipeline.yaml when that content was never published (a
deploy of a changed file); a file that is an older published version (a host deployed before the
last `levers set`) follows the newest version instead, and says so in one line. Every tick it
reads the newest version's number (one round trip) and takes up a new version once it passes the
file's own validation, phase options included; a version it refuses changes nothing and is
named in its report. An edit of its own file is published the same way as a start.

Its workers read the version it runs from a copy of its bytes under ``.levers/live/``, so they
follow a published version as they follow the file: a stat per job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

from levers.errors import LeversError
from levers.files import make_state_dir, write_atomically
from levers.pipeline.loading import LoadedPipeline
from levers.pipeline.published import (
    Version,
    differences,
    live_version,
    loaded_from,
    publish,
    read_published,
    was_published,
)
from levers.pipeline.watching import PipelineWatcher, lever_changes
from levers.server.outage import UNREACHABLE

log = logging.getLogger("levers.supervisor.reconcile")


def copy_path(state_dir: Path, pid: int) -> Path:
    """Where a supervisor keeps the bytes of the version it runs, for its workers."""
    return state_dir / "live" / f"{pid}.yaml"


class Follower:
    """Publishes a supervisor's file, follows the newest published version, and keeps the copy
    its workers read. ``took_up`` is called with each version it takes up from elsewhere."""

    def __init__(
        self, connection: redis.Redis, watcher: PipelineWatcher, copy: Path, by: str,
        took_up: Callable[[LoadedPipeline], None] = lambda loaded: None,
    ) -> None:  # fmt: skip
        self.connection = connection
        self.watcher = watcher
        self.copy = copy
        self.by = by
        self.took_up = took_up
        self.version: Version | None = None  # the published version it runs; None: not known yet
        self.error: str | None = None  # why the newest published version was refused
        self._started = False
        self._file_digest = watcher.file_digest
        self._refused: Version | None = None
        self._copied: str | None = None
        self._warned: str | None = None

    @property
    def name(self) -> str:
        return self.watcher.current().spec.name

    def tick(self) -> None:
        """The first: publish the file, or follow the newest version, before any worker starts.
        Then: publish an edit of the file; take up a newer published version. While Redis does not
        answer the supervisor runs on (its lease says so in the log); any other refusal of Redis's
        is a warning. The next tick tries again."""
        try:
            self._tick()
        except UNREACHABLE:
            pass
        except redis.RedisError as exc:
            if str(exc) != self._warned:
                log.warning("could not follow the published pipeline: %s", exc)
            self._warned = str(exc)
        else:
            self._warned = None
        self.keep_copy()

    def _tick(self) -> None:
        if not self._started:
            self._start()
        loaded = self.watcher.current()  # takes up an edit of the file
        if self.watcher.file_digest != self._file_digest:
            self._file_digest = self.watcher.file_digest
            if loaded.digest == self._file_digest:  # a valid edit, not a broken one
                self._publish(loaded, edited=True)
        newest = live_version(self.connection, self.name)
        if newest is not None and newest != self.version and newest != self._refused:
            self._follow(newest)

    def keep_copy(self) -> None:
        """Write the version it runs where its workers read it, when it changed."""
        loaded = self.watcher.current()
        if loaded.digest == self._copied or loaded.text is None:
            return
        try:
            make_state_dir(loaded.state_dir)
            write_atomically(self.copy, loaded.text)
            # Dated back out of the watcher's racy window, or every worker would hash it on each
            # job for 2 s: each write is a new file (a rename), so its inode tells a change anyway.
            dated = time.time() - 10
            os.utime(self.copy, (dated, dated))
        except OSError as exc:  # the workers keep the version before; the next tick tries again
            log.warning("could not hand the pipeline version to the workers: %s", exc)
            return
        self._copied = loaded.digest

    def close(self) -> None:
        self.copy.unlink(missing_ok=True)

    def _start(self) -> None:
        _remove_stale_copies(self.copy.parent)
        self._publish(self.watcher.current(), edited=False)
        self._started = True

    def _publish(self, loaded: LoadedPipeline, edited: bool) -> None:
        publication = publish(self.connection, loaded, self.by, only_if_new=True)
        version = publication.version
        if publication.outcome == "published":
            self.version = version
            log.info("published pipeline.yaml as version %s%s", version.label, " (edited)" if edited else "")
        elif publication.outcome == "same":
            self.version = version
        else:  # an older version's content: the newest is followed instead
            number = was_published(self.connection, self.name, loaded.digest)
            self.version = Version(number, loaded.digest) if number else None
            # at a start, one line says why the file is not what runs; an edit lost a race with a set
            said = f"pipeline.yaml here is the published v{number}" if number and not edited else None
            self._follow(version, older=said)

    def _follow(self, newest: Version, older: str | None = None) -> None:
        current = self.watcher.current()
        if newest.digest == current.digest:
            self.version, self.error = newest, None
            return
        published = read_published(self.connection, self.name)
        if published is None or published.version != newest:  # malformed, or superseded meanwhile
            self._refuse(newest, "its record in Redis is malformed" if published is None else None)
            return
        try:
            loaded = loaded_from(published, current.path, current.spec.name, check_imports=True)
        except LeversError as exc:
            self._refuse(newest, str(exc).replace("\n", "; "))
            return
        self.watcher.adopt(loaded)
        self.version, self.error, self._refused = newest, None, None
        if older is not None:
            changed = "; ".join(differences(current.spec, loaded.spec)) or "no setting differs"
            log.info("%s; following the newest, %s: %s", older, newest.label, changed)
        else:
            changed = lever_changes(current.spec, loaded.spec) or "no lever moved"
            by = published.by
            log.info("following pipeline version %s (published by %s): %s", newest.label, by, changed)
        self.took_up(loaded)

    def _refuse(self, version: Version, reason: str | None) -> None:
        if reason is None:  # a newer one came meanwhile: the next look takes it up
            return
        self._refused = version
        running = self.version.label if self.version else self.watcher.current().digest[:8]
        self.error = f"published pipeline version {version.label} refused, running {running}: {reason}"
        log.error("%s", self.error)


def _remove_stale_copies(directory: Path) -> None:
    """Copies left by supervisors that are gone (killed: nobody removed theirs)."""
    with contextlib.suppress(OSError):
        for copy in directory.glob("*.yaml"):
            pid = copy.stem
            if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
                copy.unlink(missing_ok=True)
