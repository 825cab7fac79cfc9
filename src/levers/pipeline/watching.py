"""Following pipeline.yaml while it is edited: the last good pipeline, and the error of a bad edit.

``current()`` is cheap when nothing changed (one stat); it re-reads and re-validates only when
the file's bytes changed, and never hands out a pipeline that failed validation, phase options
included (checked against the models of the handlers' modules, which a watcher imports). A watcher may be
shared by threads: at worst two of them read the same edit.

A supervisor's watcher may also ``adopt`` a version published by another host: it is handed out
until the file's own content changes. A worker's watcher reads its supervisor's copy of the
version it runs (``source``), named and anchored as pipeline.yaml.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from levers.errors import LeversError
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline, read_capped

if TYPE_CHECKING:
    from levers.pipeline.model import Autoscale, Pipeline


class PipelineWatcher:
    """``on_change`` is called with each new valid version of the file (not with the first);
    ``error`` is the file's own when it is invalid and ``loaded`` is its last good version."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        on_change: Callable[[LoadedPipeline], None] | None = None,
        error: str | None = None,
        source: Path | None = None,
    ) -> None:
        self.path = loaded.path
        self.source = source or self.path  # the file read: pipeline.yaml, or a supervisor's copy
        self._good = loaded
        self._on_change = on_change
        self._stamp = _stamp(self.source)
        self._looked = time.monotonic()
        self.error = error
        self.file_digest = loaded.digest  # of the file's content last read, valid or not
        self._unreadable: str | None = None  # the error of the last read that failed

    @classmethod
    def open(cls, path: Path, source: Path | None = None) -> PipelineWatcher:
        """A watcher of ``source`` (default: ``path``), read as the pipeline file ``path``."""
        if source is None:
            return cls(load_pipeline(path, check_options=True))
        try:
            raw = read_capped(source)
        except OSError:  # no copy (yet, or any more): the file itself until one is there
            return cls(load_pipeline(path, check_options=True), source=source)
        return cls(parse_pipeline(raw, path, check_options=True), source=source)

    def adopt(self, loaded: LoadedPipeline) -> None:
        """Hand out ``loaded``, a valid version from elsewhere (published by another host), until
        the file's content changes. ``on_change`` is the file's: the caller says what it took up."""
        self._good = loaded

    def current(self, max_age_s: float = 0.0) -> LoadedPipeline:
        """The newest valid version of the file (the last good one while the file is invalid);
        with ``max_age_s``, the version found by a look at the file at most that long ago."""
        now = time.monotonic()
        if now - self._looked < max_age_s:
            return self._good
        self._looked = now
        stamp = _stamp(self.source)
        if stamp == self._stamp and not _racy(stamp):
            return self._good
        self._stamp = stamp
        try:
            raw = read_capped(self.source)  # a file grown past the limit is refused, not read whole
        except OSError as exc:
            self.error = self._unreadable = f"{self.source}: {exc.strerror}"
            return self._good
        digest = hashlib.sha256(raw).hexdigest()
        # the content did not change: an adopted version stays, and so does an invalid edit's error
        if digest == self.file_digest:
            if self.error is not None and self.error == self._unreadable:
                self.error = None
            return self._good
        self.file_digest = digest
        if digest == self._good.digest:
            self.error = None
            return self._good
        try:
            self._good = parse_pipeline(raw, self.path, check_options=True)
            self.error = None
        except LeversError as exc:
            self.error = str(exc)
            return self._good
        if self._on_change is not None:
            self._on_change(self._good)
        return self._good


# Filesystem timestamps can be as coarse as 1-2 s (ext3, HFS+, FAT, some NFS): an edit in the same
# tick as the last read that keeps the size leaves the stamp unchanged. While the mtime is this
# recent the stamp is not trusted, and the file is re-read and hashed instead.
RACY_STAMP_NS = 2_000_000_000


def _racy(stamp: tuple[int, int, int] | None) -> bool:
    return stamp is not None and time.time_ns() - stamp[0] < RACY_STAMP_NS


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def lever_changes(old: Pipeline, new: Pipeline) -> str:
    """What an edit changed of the phases and their levers, in one line ('' when nothing)."""
    parts = [f"phase {name} added" for name in new.phases if name not in old.phases]
    parts += [f"phase {name} removed" for name in old.phases if name not in new.phases]
    for name in [n for n in new.phases if n in old.phases]:
        before, after = old.phases[name].levers.model_dump(), new.phases[name].levers.model_dump()
        parts += [f"{name}.{lever} {before.get(lever)} -> {value}" for lever, value in after.items()
                  if before.get(lever) != value]  # fmt: skip
        scaled_before, scaled_after = old.phases[name].autoscale, new.phases[name].autoscale
        if scaled_before != scaled_after:
            parts.append(f"{name}.autoscale {_bounds(scaled_before)} -> {_bounds(scaled_after)}")
        if old.phases[name].handler != new.phases[name].handler:
            parts.append(f"{name}.handler {old.phases[name].handler} -> {new.phases[name].handler}")
    return ", ".join(parts)


def _bounds(autoscale: Autoscale | None) -> str:
    if autoscale is None:
        return "off"
    return (f"{autoscale.min}..{autoscale.max} per_worker {autoscale.per_worker} "
            f"scale_down_after {autoscale.scale_down_after:g}")  # fmt: skip
