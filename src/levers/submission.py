"""Feeding documents in: paths to files, files to ids, ids to the entry phase's queue.

A document's id is a hash of its content, so the same content submitted twice is processed
once (unless forced). Problems with one path never stop the others: each outcome is reported.
"""

from __future__ import annotations

import glob
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from levers import keys
from levers.errors import DocumentError, LeversError
from levers.ledger import Ledger
from levers.loading import LoadedPipeline
from levers.routing import ID_HEX_DIGITS, enqueue_phase, entry_phase
from levers.store import ArtifactStore

# In-memory documents wait in Redis at most this long for their entry phase.
BLOB_TTL_S = 7 * 24 * 3600


@dataclass(frozen=True)
class Outcome:
    """What happened to one submitted path: queued, skipped (already known, or left out with a
    ``reason``) or an error."""

    source: str
    doc_id: str | None = None
    phase: str | None = None
    skipped: bool = False
    error: str | None = None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def document_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:ID_HEX_DIGITS]


def expand(paths: Iterable[str]) -> Iterator[tuple[str, Path | None]]:
    """(as given, file) for every file a path names: files, directories (recursive), globs.

    A path that names nothing yields (path, None). Hidden files and directories are skipped.
    """
    for given in paths:
        path = Path(given)
        if path.is_file():
            yield given, path
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
            yield from ((str(p), p) for p in found)
        elif matches := sorted(glob.glob(given, recursive=True)):
            yield from expand(matches)
        else:
            yield given, None


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


class Submitter:
    def __init__(self, loaded: LoadedPipeline, connection: redis.Redis) -> None:
        self.spec = loaded.spec
        self.connection = connection
        self.store = ArtifactStore(loaded.store_dir)
        self.ledger = Ledger(connection, loaded.spec.name)

    def submit_paths(self, paths: Iterable[str], force: bool = False) -> list[Outcome]:
        outcomes = []
        for given, path in expand(paths):
            if path is None:
                outcomes.append(Outcome(given, error=f"{given}: no such file or directory"))
                continue
            try:
                outcomes.append(self._submit_file(given, path, force))
            except OSError as exc:
                outcomes.append(Outcome(given, error=f"{given}: cannot read ({exc.strerror})"))
            except LeversError as exc:
                outcomes.append(Outcome(given, error=str(exc)))
        return outcomes

    def _submit_file(self, given: str, path: Path, force: bool) -> Outcome:
        phase = entry_phase(self.spec, path.name, "files")
        data = path.read_bytes()
        if self.spec.phases[phase].input == "bytes":
            return self.submit_bytes(data, path.name, force, source=given)
        doc_id = document_id(data)
        if not self.ledger.claim(doc_id, path.name, "files", phase, force):
            return Outcome(given, doc_id, phase, skipped=True)
        self.store.put_document(doc_id, path.name, data)
        enqueue_phase(self.connection, self.spec, phase, doc_id, path.name)
        return Outcome(given, doc_id, phase)

    def submit_bytes(self, data: bytes, name: str, force: bool = False, source: str = "-") -> Outcome:
        """Submit a document held in memory; it is kept in Redis, never written to disk."""
        if not data:
            raise DocumentError(f"{name}: the document is empty", fix="submit a file with content")
        phase = entry_phase(self.spec, name, "bytes")
        doc_id = document_id(data)
        as_bytes = self.spec.phases[phase].input == "bytes"
        if not self.ledger.claim(doc_id, name, "bytes" if as_bytes else "files", phase, force):
            return Outcome(source, doc_id, phase, skipped=True)
        if as_bytes:
            self.connection.set(keys.blob(self.spec.name, doc_id), data, ex=BLOB_TTL_S)
        else:
            self.store.put_document(doc_id, name, data)
        enqueue_phase(self.connection, self.spec, phase, doc_id, name)
        return Outcome(source, doc_id, phase)
