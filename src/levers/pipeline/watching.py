"""Following pipeline.yaml while it is edited: the last good pipeline, and the error of a bad edit.

``current()`` is cheap when nothing changed (one stat); it re-reads and re-validates only when
the file's bytes changed, and never hands out a pipeline that failed validation, phase options
included (checked against the models of the handlers' modules, which a watcher imports). A watcher may be
shared by threads: at worst two of them read the same edit.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from levers.errors import LeversError
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline, read_capped
from levers.pipeline.model import Autoscale, Pipeline


class PipelineWatcher:
    """``on_change`` is called with each new valid version (not with the first); ``error`` is the
    file's own when it is invalid and ``loaded`` is its last good version."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        on_change: Callable[[LoadedPipeline], None] | None = None,
        error: str | None = None,
    ) -> None:
        self.path = loaded.path
        self._good = loaded
        self._on_change = on_change
        self._stamp = _stamp(self.path)
        self._looked = time.monotonic()
        self.error = error

    @classmethod
    def open(cls, path: Path) -> PipelineWatcher:
        return cls(load_pipeline(path, check_options=True))

    def current(self, max_age_s: float = 0.0) -> LoadedPipeline:
        """The newest valid version of the file (the last good one while the file is invalid);
        with ``max_age_s``, the version found by a look at the file at most that long ago."""
        now = time.monotonic()
        if now - self._looked < max_age_s:
            return self._good
        self._looked = now
        stamp = _stamp(self.path)
        if stamp == self._stamp and not _racy(stamp):
            return self._good
        self._stamp = stamp
        try:
            raw = read_capped(self.path)  # a file grown past the limit is refused, not read whole
        except OSError as exc:
            self.error = f"{self.path}: {exc.strerror}"
            return self._good
        if hashlib.sha256(raw).hexdigest() == self._good.digest:
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
