"""Feeding documents in: paths to files, files to ids, ids to the entry phase's queue.

A document's id is a hash of its content, so the same content submitted twice is processed
once (unless forced), and every name it came under is kept. Other content under a name seen
before is a new version of it (levers.documents.versions). A name whose extension lies about the
content (HTML saved as .pdf) is routed by what the content is. Problems with one path never stop
the others: each outcome is reported.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from levers import keys
from levers.documents.lanes import checked_priority
from levers.documents.ledger import Ledger
from levers.documents.routing import ID_HEX_DIGITS, accepted_by_entry, enqueue_phase, entry_phase
from levers.documents.sniffing import routed_name
from levers.documents.store import project_store
from levers.documents.versions import DocumentVersion, Versions, content_hash, version_name
from levers.errors import DocumentError, LeversError, StoreError
from levers.pipeline.loading import LoadedPipeline

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
    version: int | None = None  # its number among the versions of its name

    @property
    def ok(self) -> bool:
        return self.error is None


def document_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:ID_HEX_DIGITS]


@dataclass(frozen=True)
class Found:
    """A file a submitted path names (``path``, to read), or why one is not submitted."""

    source: str  # the path as given, or the file's path under a given directory
    path: Path | None = None
    error: str | None = None  # refused: bad input
    skipped: str | None = None  # left out on purpose


def expand(paths: Iterable[str]) -> Iterator[Found]:
    """Every file the paths name: files, directories (recursive), globs; and why others are not.

    A path named (or matched by a glob) is followed wherever it leads: the user asked for it.
    Under a directory, hidden files are skipped, symlinks that lead out of it are left out (and
    said so), and symlinks to directories are not descended, so no loop is possible. Only regular
    files with content are submitted: FIFOs, devices, sockets and empty files are refused.
    """
    for given in paths:
        if os.path.lexists(given):
            yield from _named(given)
        elif matches := sorted(glob.glob(given, recursive=True)):
            for match in matches:
                yield from _named(match)
        else:
            yield Found(given, error=f"{given}: no such file or directory")


def _named(given: str) -> Iterator[Found]:
    path = Path(given)
    try:
        info = path.stat()
    except OSError as exc:
        yield Found(given, error=_unreadable(given, path, exc))
        return
    if stat.S_ISDIR(info.st_mode):
        yield from _walk(given, path)
    else:
        yield _file(given, path.resolve(), info)


def _walk(given: str, root: Path) -> Iterator[Found]:
    """The files under directory ``root``, in path order, each once (a file and a symlink to it
    within the directory: the file)."""
    inside = root.resolve()
    found: list[Entry] = []

    def failed(exc: OSError) -> None:
        found.append(Entry(Found(str(exc.filename), error=f"{exc.filename}: cannot read ({exc.strerror})")))

    for directory, dirnames, filenames in os.walk(root, onerror=failed):  # never descends a symlink
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        links = [d for d in dirnames if Path(directory, d).is_symlink()]  # listed, not descended
        for name in [*filenames, *links]:
            if not name.startswith("."):
                found += _entry(given, Path(directory, name), inside)
    direct = {entry.file for entry in found if not entry.via_link}
    seen: set[tuple[int, int] | None] = set()
    for entry in sorted(found, key=lambda e: Path(e.found.source)):
        if entry.file is None or not (entry.file in seen or (entry.via_link and entry.file in direct)):
            seen.add(entry.file)
            yield entry.found


@dataclass(frozen=True)
class Entry:
    """What one entry of a walked directory adds, and the file (device, inode) it leads to."""

    found: Found
    file: tuple[int, int] | None = None
    via_link: bool = False


def _entry(given: str, path: Path, inside: Path) -> list[Entry]:
    source = str(path)
    try:
        info = path.lstat()
        if not stat.S_ISLNK(info.st_mode):
            return [Entry(_file(source, path, info), (info.st_dev, info.st_ino))]
        real = path.resolve(strict=True)
        info = real.stat()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        return [Entry(Found(source, error=_unreadable(source, path, exc)))]
    if not real.is_relative_to(inside):
        return [Entry(Found(source, skipped=f"a symlink out of {given} (to {os.readlink(path)})"))]
    if stat.S_ISDIR(info.st_mode):
        return []  # a symlink to a directory within: its files come by their own path
    return [Entry(_file(source, real, info), (info.st_dev, info.st_ino), via_link=True)]


def _file(source: str, real: Path, info: os.stat_result) -> Found:
    problem = not_submittable(info)
    return Found(source, error=f"{source}: {problem}") if problem else Found(source, real)


def not_submittable(info: os.stat_result) -> str | None:
    """Why a file with this stat cannot be a document, or None."""
    if not stat.S_ISREG(info.st_mode):
        return f"not a regular file ({_kind(info.st_mode)}); submit regular files"
    if info.st_size == 0:
        return "empty file, nothing to process"
    return None


def _kind(mode: int) -> str:
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
             stat.S_ISSOCK: "a socket", stat.S_ISDIR: "a directory"}  # fmt: skip
    return next((kind for test, kind in kinds.items() if test(mode)), "not a file")


def read_document(source: str, path: Path) -> bytes:
    """The bytes of the regular file at ``path``, checked again on the open file: what was found
    may have been replaced since (by a FIFO, which would block the read, or a symlink)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as handle:
        problem = not_submittable(os.fstat(fd))
        data = b"" if problem else handle.read()
    if problem or not data:
        raise DocumentError(f"{source}: {problem or 'empty file, nothing to process'}")
    return data


def _unreadable(source: str, path: Path, exc: Exception) -> str:
    if isinstance(exc, RuntimeError) or getattr(exc, "errno", None) == errno.ELOOP:
        return f"{source}: a symlink loop"
    if isinstance(exc, FileNotFoundError) and path.is_symlink():
        return f"{source}: a symlink to {os.readlink(path)}, which does not exist"
    return f"{source}: cannot read ({getattr(exc, 'strerror', None) or exc})"


class Submitter:
    def __init__(self, loaded: LoadedPipeline, connection: redis.Redis) -> None:
        self.spec = loaded.spec
        self.connection = connection
        self.store = project_store(loaded)
        self.ledger = Ledger(connection, loaded.spec.name)
        self.versions = Versions(connection, loaded.spec.name)

    def submit_paths(
        self, paths: Iterable[str], force: bool = False, priority: str = keys.NORMAL,
        keep_versions: bool = False, reuse: bool = True,
    ) -> list[Outcome]:  # fmt: skip
        """Submit the files ``paths`` name; their documents take the lane of ``priority``
        (high, normal or low) through every phase. ``keep_versions``: what older versions of
        their names wrote stays (else phases remove it). Without ``reuse``, every phase does the
        work even where a stored result would do, and documents already done run again
        (``force``)."""
        checked_priority(priority)
        outcomes = []
        for found in expand(paths):
            source = found.source
            if found.path is None:
                outcomes.append(
                    Outcome(source, error=found.error, skipped=not found.error, reason=found.skipped)
                )
                continue
            try:
                outcomes.append(self._submit_file(source, found.path, force, priority, keep_versions, reuse))
            except OSError as exc:
                outcomes.append(Outcome(source, error=f"{source}: cannot read ({exc.strerror})"))
            except StoreError:
                raise  # not this file's fault: no other file would fare better
            except LeversError as exc:
                outcomes.append(Outcome(source, error=str(exc)))
        return outcomes

    def _submit_file(
        self, source: str, path: Path, force: bool, priority: str, keep: bool, reuse: bool
    ) -> Outcome:
        name = Path(source).name  # as the user named it (``path`` is where a symlink led)
        entry_phase(self.spec, name, "files")  # an unsupported type is refused before it is read
        data = read_document(source, path)
        working = routed_name(name, data, lambda suffix: accepted_by_entry(self.spec, suffix))
        phase = entry_phase(self.spec, working, "files")
        if self.spec.phases[phase].input == "bytes":
            return self.submit_bytes(
                data, name, force, source=source, priority=priority, keep_versions=keep,
                version_of=version_name(source, in_memory=False), reuse=reuse,
            )  # fmt: skip
        doc_id = document_id(data)
        # stored before it is recorded: a store that fails leaves no record that would make a
        # second submission a duplicate of a document whose bytes are missing
        self.store.put_document(doc_id, working, data)
        version, force = self._version(version_name(source, in_memory=False), doc_id, data, keep, force)
        if not self.ledger.add(
            doc_id, working, "files", phase, force or not reuse, submitted_as=name, priority=priority,
            version=version, reuse=reuse,
        ):  # fmt: skip
            return Outcome(source, doc_id, phase, skipped=True, version=version.number)
        enqueue_phase(self.connection, self.spec, phase, doc_id, working, priority=priority)
        return Outcome(source, doc_id, phase, version=version.number)

    def _version(
        self, name: str, doc_id: str, data: bytes, keep: bool, force: bool
    ) -> tuple[DocumentVersion, bool]:
        """The version of ``name`` the document is, and whether it runs even if known: a new
        version runs though its content was an older version's (or is known under another name),
        so that it replaces the version before it."""
        version, new = self.versions.add(name, doc_id, content_hash(data), keep)
        return version, force or (new and version.number > 1)

    def submit_bytes(
        self, data: bytes, name: str, force: bool = False, source: str = "-", priority: str = keys.NORMAL,
        keep_versions: bool = False, version_of: str | None = None, reuse: bool = True,
    ) -> Outcome:  # fmt: skip
        """Submit a document held in memory; it is kept in Redis, never written to disk. It takes
        the lane of ``priority`` (high, normal or low) through every phase, as a version of
        ``version_of`` (default: ``name``), older versions' output kept with ``keep_versions``;
        ``reuse`` as for ``submit_paths``."""
        checked_priority(priority)
        if not data:
            raise DocumentError(f"{name}: empty document, nothing to process", fix="submit one with content")
        entry_phase(self.spec, name, "bytes")
        working = routed_name(name, data, lambda suffix: accepted_by_entry(self.spec, suffix))
        phase = entry_phase(self.spec, working, "bytes")
        doc_id = document_id(data)
        as_bytes = self.spec.phases[phase].input == "bytes"
        kind = "bytes" if as_bytes else "files"
        if not as_bytes:
            self.store.put_document(doc_id, working, data)  # before the record, as for a file
        version, force = self._version(version_of or name, doc_id, data, keep_versions, force)
        if not self.ledger.add(
            doc_id, working, kind, phase, force or not reuse, submitted_as=name, priority=priority,
            version=version, reuse=reuse,
        ):  # fmt: skip
            return Outcome(source, doc_id, phase, skipped=True, version=version.number)
        if as_bytes:
            self.connection.set(keys.blob(self.spec.name, doc_id), data, ex=BLOB_TTL_S)
        enqueue_phase(self.connection, self.spec, phase, doc_id, working, priority=priority)
        return Outcome(source, doc_id, phase, version=version.number)
