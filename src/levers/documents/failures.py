"""Failed documents: listed, retried at the phase where they failed, expired and purged.

The ledger adds a document that fails for good to its phase's failed set (keys.failed), scored by
when it failed. Its record is kept for the pipeline's ``failed_ttl``: past that, supervisors
forget it (the record, its set entries, its bytes held in Redis and its stored files), so Redis
holds a bounded number of failed documents whatever the traffic. Readers count and list only what
is kept, so `levers status` and `levers failed` agree with each other before and after an expiry.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import redis

from levers import keys
from levers.documents.ledger import DocStatus, DocumentRecord, Ledger
from levers.errors import UsageError

if TYPE_CHECKING:
    from levers.documents.store import ArtifactStore
    from levers.pipeline.model import Pipeline

# How often a supervisor looks for failed documents past failed_ttl.
EXPIRY_EVERY_S = 60.0
# Failed documents forgotten per transaction: a big expiry goes in slices, never one huge command.
FORGET_BATCH = 500

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> float:
    """Seconds in "90", "30s", "15m", "1h", "30d" or "2w"; UsageError naming ``option`` otherwise."""
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise UsageError(f"{option} {text!r} is not a duration", fix=f"write e.g. {option} 1h, 30m or 30d")
    return float(match[1]) * _UNIT_S[match[2]]


@dataclass(frozen=True)
class FailedDocument:
    """One failed document as `levers failed` lists it."""

    id: str
    names: list[str]
    phase: str  # where it failed
    attempts: int  # attempts at that phase
    error: str  # the first line of the last attempt's error
    failed_at: float

    def as_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Retried:
    """What `levers retry` did with one id: requeued at ``phase``, or why not (``error``)."""

    given: str
    doc_id: str | None = None
    names: tuple[str, ...] = ()
    phase: str | None = None
    error: str | None = None
    bad_input: bool = False  # an id that names no failed document, rather than one that cannot go back


class Failures:
    """The failed documents of one pipeline."""

    def __init__(self, connection: redis.Redis, spec: Pipeline, store: ArtifactStore) -> None:
        self.connection = connection
        self.spec = spec
        self.store = store
        self.ledger = Ledger(connection, spec.name)

    def listed(self, phase: str | None = None, since_s: float | None = None) -> list[FailedDocument]:
        """Failed documents kept, oldest failure first; at ``phase`` only, failed in the last
        ``since_s`` only."""
        now = time.time()
        oldest = now - min(self.spec.failed_ttl, since_s if since_s is not None else float("inf"))
        found: list[FailedDocument] = []
        for name in self._phases(phase):
            key = keys.failed(self.spec.name, name)
            entries: list[tuple[bytes, float]] = self.connection.zrangebyscore(
                key, oldest, "+inf", withscores=True
            )  # type: ignore[assignment]
            ids = [_text(member) for member, _ in entries]
            for record, (_, score) in zip(self.ledger.get_many(ids), entries, strict=True):
                if record is not None and record.status is DocStatus.FAILED and record.phase == name:
                    found.append(_failed(record, score))
        return sorted(found, key=lambda f: f.failed_at)

    def ids(self, phase: str | None = None) -> list[str]:
        """The ids of every failed document kept (at ``phase`` only)."""
        return [failed.id for failed in self.listed(phase)]

    def retry(self, given: Iterable[str]) -> list[Retried]:
        """Requeue each failed document at the phase where it failed, its earlier phases' outputs
        kept; ids may be unique prefixes."""
        outcomes = []
        for text in given:
            matches = self.ledger.find(text) if text else []
            if len(matches) != 1:
                problem = "no document with this id" if not matches else f"matches {len(matches)} documents"
                outcomes.append(Retried(text, error=f"{text}: {problem}", bad_input=True))
                continue
            outcomes.append(self._retry_one(text, matches[0]))
        return outcomes

    def expire(self) -> int:
        """Forget failed documents past failed_ttl; how many."""
        return self.purge(older_than_s=self.spec.failed_ttl)

    def purge(self, older_than_s: float = 0.0) -> int:
        """Forget failed documents that failed longer ago than ``older_than_s``: their records,
        bytes and stored files; how many."""
        cutoff = time.time() - older_than_s
        forgotten = 0
        for phase in self.spec.phases:
            key = keys.failed(self.spec.name, phase)
            while due := self._failed_before(key, cutoff):
                forgotten += sum(self._forget(doc_id, phase) for doc_id in due)
        return forgotten

    def _failed_before(self, key: str, cutoff: float) -> list[str]:
        members: list[bytes] = self.connection.zrangebyscore(key, "-inf", cutoff, 0, FORGET_BATCH)  # type: ignore[assignment]
        return [_text(member) for member in members]

    def due(self, older_than_s: float = 0.0) -> int:
        """How many failed documents ``purge`` would forget."""
        cutoff = time.time() - older_than_s
        return sum(
            int(self.connection.zcount(keys.failed(self.spec.name, phase), "-inf", cutoff))
            for phase in self.spec.phases
        )

    def _phases(self, phase: str | None) -> list[str]:
        if phase is None:
            return list(self.spec.phases)
        if phase not in self.spec.phases:
            raise UsageError(f"no phase named {phase!r}", fix=f"phases: {', '.join(self.spec.phases)}")
        return [phase]

    def _retry_one(self, given: str, doc_id: str) -> Retried:
        doc_key = keys.document(self.spec.name, doc_id)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(doc_key)
                    record = self.ledger.get(doc_id)
                    problem = self._not_retriable(record)
                    if problem is not None or record is None:
                        not_failed = record is not None and record.status is not DocStatus.FAILED
                        return Retried(given, doc_id, error=f"{given}: {problem}", bad_input=not_failed)
                    self._requeue(pipe, record)
                    pipe.execute()
                    return Retried(given, doc_id, tuple(record.names), record.phase)
                except redis.WatchError:
                    continue

    def _not_retriable(self, record: DocumentRecord | None) -> str | None:
        """Why a record cannot be requeued where it failed, or None."""
        if record is None:
            return "its record is gone (expired or purged); submit the file again"
        if record.status is not DocStatus.FAILED:
            return f"is {record.status}, not failed: nothing to retry"
        if record.phase not in self.spec.phases:
            gone = f"it failed at {record.phase!r}, which is no longer in pipeline.yaml"
            return f"{gone}; submit it again with --force"
        feeders = self.spec.feeders(record.phase)
        if not feeders:
            held = (
                self.connection.exists(keys.blob(self.spec.name, record.id))
                if record.input == "bytes"
                else self.store.has_document(record.id, record.name)
            )
            return None if held else "its bytes are no longer kept; submit it again"
        if not any(self.store.has_output(record.id, p) for p in feeders):
            return f"the output {record.phase} reads is no longer in the store; submit it again with --force"
        return None

    def _requeue(self, pipe: redis.client.Pipeline, record: DocumentRecord) -> None:
        # routing (RQ's jobs) only here: `levers status` counts failed documents with this module
        from levers.documents.routing import enqueue_phase

        # RQ's enqueue opens the transaction (MULTI) itself, so it comes first
        enqueue_phase(
            self.connection, self.spec, record.phase, record.id, record.name, pipeline=pipe,
            priority=record.priority,
        )  # fmt: skip
        doc_key = keys.document(self.spec.name, record.id)
        pipe.hset(doc_key, "status", str(DocStatus.QUEUED))
        pipe.hdel(doc_key, "error", "finished")
        pipe.zrem(keys.failed(self.spec.name, record.phase), record.id)

    def _forget(self, doc_id: str, phase: str) -> bool:
        """Remove a failed document; False when it is no longer failed there (it was submitted or
        retried meanwhile), and then only its stale set entry goes."""
        doc_key = keys.document(self.spec.name, doc_id)
        failed_key = keys.failed(self.spec.name, phase)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(doc_key)
                    at = [_text(v or b"") for v in pipe.hmget(doc_key, "status", "phase")]
                    still = at == [DocStatus.FAILED, phase]
                    pipe.multi()
                    pipe.zrem(failed_key, doc_id)
                    if still:
                        pipe.delete(doc_key, keys.blob(self.spec.name, doc_id))
                        pipe.zrem(keys.documents(self.spec.name), doc_id)
                    pipe.execute()
                    break
                except redis.WatchError:
                    continue
        if still:
            self.store.remove_document(doc_id)
        return still


class FailedExpiry:
    """A supervisor's part in keeping Redis bounded: every EXPIRY_EVERY_S, forget the failed
    documents past failed_ttl."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self._last = float("-inf")

    def due(self) -> bool:
        """Whether it is time to look again; each True starts the next wait."""
        now = time.monotonic()
        if now - self._last < EXPIRY_EVERY_S:
            return False
        self._last = now
        return True

    def expire(self, spec: Pipeline, store: ArtifactStore) -> int:
        return Failures(self.connection, spec, store).expire()


def _failed(record: DocumentRecord, failed_at: float) -> FailedDocument:
    run = record.phases.get(record.phase)
    error = (run.error if run is not None else None) or record.error or ""
    return FailedDocument(
        id=record.id,
        names=record.names,
        phase=record.phase,
        attempts=run.attempts if run is not None else 0,
        error=error.splitlines()[0] if error else "",
        failed_at=failed_at,
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
