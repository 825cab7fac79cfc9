"""Where each document stands: one Redis hash per document, written by submitters and workers.

Fields: name (the one phases see), names (JSON: every name the content was submitted under), input
(files|bytes), priority (its lane in every phase: high|normal|low), reuse (``no`` when submitted
with ``--no-reuse``: its jobs do the work even where a stored result would do), status, phase,
submitted, finished, error, version_of, version and keep_versions (which version of which name
it runs as, levers.documents.versions), and per phase
``<phase>:started``, ``<phase>:seconds``, ``<phase>:attempts``, ``<phase>:error``, ``<phase>:lost``
(the last host lost while it ran this phase), ``<phase>:reused`` (its result was a stored one).

An attempt is the document's current one while the document is at its phase, running, with the
attempt count it started with. Only the current attempt may record its outcome: a worker cut off
from Redis whose job was taken over and run again elsewhere comes back to find its attempt
superseded, and hands nothing off.

The ledger records every outcome of an attempt, with its phase's totals and metrics: finished,
failed, retried.

A document that fails for good is added to its phase's failed set (keys.failed), scored by when
it failed; levers.documents.failures lists, retries, expires and purges from there.

A done document keeps its record (a few hundred bytes: names within MAX_NAMES_BYTES, errors
within a line, no job's result) and a copy goes to the artifact store as it finishes
(levers.documents.history); its id moves from the documents not done (keys.documents) to the
finished ones (keys.finished), scored by when it finished. Past the pipeline's ``retention`` the
record goes and only the id stays, in the expired set (keys.expired, levers.documents.retention),
so the same content is still not processed twice.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import redis
from redis.commands.core import Script

from levers import keys, metrics
from levers.documents.versions import DocumentVersion

# KEYS: the document's hash. ARGV: phase, time, the running status. Marks an attempt started and
# returns the hash (HGETALL's flat list); nil, writing nothing, when the document is unknown; 0,
# writing nothing, when the document is past this phase (a copy of a job that ran already). A
# failed document's job may run again (requeued by hand with RQ's tools, say).
_START = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local at = redis.call('HMGET', KEYS[1], 'phase', 'status')
if at[1] ~= ARGV[1] or at[2] == 'done' then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':attempts', 1)
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'phase', ARGV[1], ARGV[1] .. ':started', ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: the document's hash. ARGV: phase, when the job was taken off its queue, the queued status,
# the attempt it started ('' if unknown). Takes back the attempt the job started, if its start was
# recorded (at or after it was taken) and no later attempt started since; returns 1 then, else 0: a
# worker killed between taking a job and recording its start leaves no attempt.
_RELEASE = """
local started = tonumber(redis.call('HGET', KEYS[1], ARGV[1] .. ':started') or '0')
if started < tonumber(ARGV[2]) then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], ARGV[1] .. ':attempts') ~= ARGV[4] then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1] .. ':attempts', -1)
redis.call('HSET', KEYS[1], 'status', ARGV[3])
return 1
"""

# KEYS: the document's hash, the phase's totals. ARGV: phase, reason, the running and queued
# statuses. A running attempt whose host was lost goes back to queued, the reason recorded and a
# retry counted; 1 if so, 0 (writing nothing) when the document is no longer running that phase.
_HOST_LOST = """
local at = redis.call('HMGET', KEYS[1], 'phase', 'status')
if at[1] ~= ARGV[1] or at[2] ~= ARGV[3] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[4], ARGV[1] .. ':error', ARGV[2], ARGV[1] .. ':lost', ARGV[2])
redis.call('HINCRBY', KEYS[2], 'retried', 1)
return 1
"""


@dataclass(frozen=True)
class _Scripts:
    start: Script
    release: Script
    host_lost: Script


# Registered once per client; weak, so a client and its scripts go together.
_scripts: weakref.WeakKeyDictionary[redis.Redis, _Scripts] = weakref.WeakKeyDictionary()


def _scripts_for(client: redis.Redis) -> _Scripts:
    if client not in _scripts:
        _scripts[client] = _Scripts(*(client.register_script(s) for s in (_START, _RELEASE, _HOST_LOST)))
    return _scripts[client]


# Names kept per document: the same bytes under more names than this are one document all the same.
MAX_NAMES = 32
# ... and no more of them than fit in this many bytes (as JSON), so a record stays small in Redis.
MAX_NAMES_BYTES = 512


class Superseded(Exception):
    """The attempt is not the document's current one: its job was taken over and run again, or
    the document is past this phase."""


class DocStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class PhaseRecord:
    started: float | None
    seconds: float | None
    attempts: int
    error: str | None
    lost: str | None = None  # the last host lost while it ran this phase
    reused: bool = False  # the phase's result was a stored one (levers.worker.reuse): no handler ran


@dataclass(frozen=True)
class DocumentRecord:
    id: str
    name: str
    input: str
    status: DocStatus
    phase: str
    submitted: float
    finished: float | None
    error: str | None
    phases: dict[str, PhaseRecord] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # every name it was submitted under, first first
    priority: str = keys.NORMAL  # the lane its jobs take in every phase
    version: DocumentVersion | None = None  # the version of a name it runs as
    expired: bool = False  # done, its record expired (retention): only its id is known
    reuse: bool = True  # its jobs may take stored results (False: submitted with --no-reuse)


class Ledger:
    def __init__(self, connection: redis.Redis, pipeline: str) -> None:
        self.connection = connection
        self.pipeline = pipeline

    def _key(self, doc_id: str) -> str:
        return keys.document(self.pipeline, doc_id)

    def add(
        self, doc_id: str, name: str, input_kind: str, phase: str, force: bool,
        submitted_as: str | None = None, priority: str = keys.NORMAL,
        version: DocumentVersion | None = None, reuse: bool = True,
    ) -> bool:  # fmt: skip
        """Add a submitted document, with the lane of ``priority``; False when it is already in
        the pipeline or done (its priority then stays what it was). Without ``reuse``, its jobs
        do the work even where a stored result would do.

        A document that failed may always be submitted again. ``name`` is what phases see (the
        name with its content's real extension); ``submitted_as`` (default ``name``) joins the
        names the content was submitted under, whether it runs again or not. ``version``: the
        version of a name it runs as, recorded when it runs.
        """
        key = self._key(doc_id)
        status, was_at, names, was_named = self.connection.hmget(key, "status", "phase", "names", "name")
        known = _with_name(_names(names, _text(was_named or b"")), submitted_as or name)
        if status is not None and not force and _text(status) != DocStatus.FAILED:
            self.connection.hset(key, "names", json.dumps(known))
            return False
        if status is None and not force and self.connection.sismember(keys.expired(self.pipeline), doc_id):
            return False  # done, and its record expired: the content is known all the same
        now = time.time()
        fields: dict[Any, str | float] = {
            "name": name, "names": json.dumps(known), "input": input_kind, "status": DocStatus.QUEUED,
            "phase": phase, "submitted": now, "priority": priority,
        }  # fmt: skip
        if version is not None:
            keep = int(version.keep)
            fields |= {"version_of": version.name, "version": version.number, "keep_versions": keep}
        with self.connection.pipeline() as pipe:
            pipe.delete(key)
            pipe.hset(key, mapping=fields if reuse else fields | {"reuse": "no"})
            pipe.zadd(keys.documents(self.pipeline), {doc_id: now})
            pipe.zrem(keys.finished(self.pipeline), doc_id)
            pipe.srem(keys.expired(self.pipeline), doc_id)
            if was_at:  # submitted again after it failed there: no longer a failed document
                pipe.zrem(keys.failed(self.pipeline, _text(was_at)), doc_id)
            pipe.execute()
        return True

    def start(self, doc_id: str, phase: str) -> DocumentRecord | None:
        """Mark a phase attempt started and return the document's record, in one round trip.

        None when the document is unknown (and then nothing is written).
        """
        flat = _scripts_for(self.connection).start(
            keys=[self._key(doc_id)], args=[phase, repr(time.time()), str(DocStatus.RUNNING)]
        )
        if flat == 0:
            raise Superseded(f"document {doc_id} is past {phase}: this job ran already")
        if not flat:
            return None
        return _record(doc_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    def commit_if_current(
        self, doc_id: str, phase: str, attempt: int, write: Callable[[redis.client.Pipeline], None]
    ) -> None:
        """Run ``write`` in one transaction only while ``attempt`` of ``phase`` is the document's
        current attempt; raise Superseded when it is not.

        ``write`` queues its commands on the pipeline after opening the transaction (RQ's enqueue
        opens it itself). The document is watched from the check to the commit, so an attempt
        superseded in between (its job taken over) commits nothing.
        """
        key = self._key(doc_id)
        with self.connection.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    at = pipe.hmget(key, "phase", "status", f"{phase}:attempts")
                    if [_text(v or b"") for v in at] != [phase, DocStatus.RUNNING, str(attempt)]:
                        raise Superseded(f"attempt {attempt} of {phase} on {doc_id} was taken over")
                    write(pipe)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def host_lost(self, doc_id: str, phase: str, reason: str) -> bool:
        """Put back to queued a document whose running attempt of ``phase`` was lost with its host,
        recording ``reason``; False (nothing written) when the document is no longer running it."""
        keys_ = [self._key(doc_id), keys.phase_counter(self.pipeline, phase)]
        return bool(
            _scripts_for(self.connection).host_lost(
                keys=keys_, args=[phase, reason, str(DocStatus.RUNNING), str(DocStatus.QUEUED)]
            )
        )

    def released(self, doc_id: str, phase: str, taken_at: float = 0.0, attempt: int | None = None) -> bool:
        """Take back a ``start`` whose job went back to its queue before it ran, or was cut short.

        ``taken_at``: when the job was taken off its queue (same host's clock as ``start``); a
        start recorded before it was an earlier attempt's, and is kept. ``attempt``: the one the
        job started, when known; a later attempt (the job taken over and started again elsewhere)
        is kept. True when an attempt was taken back.
        """
        args = [phase, repr(taken_at), str(DocStatus.QUEUED), "" if attempt is None else str(attempt)]
        return bool(_scripts_for(self.connection).release(keys=[self._key(doc_id)], args=args))

    def release_on(
        self,
        pipe: redis.client.Pipeline,
        doc_id: str,
        phase: str,
        taken_at: float,
        attempt: int | None = None,
    ) -> None:
        """``released``, queued on ``pipe``: for a transaction that puts the job back."""
        args = [phase, repr(taken_at), str(DocStatus.QUEUED), "" if attempt is None else str(attempt)]
        _scripts_for(self.connection).release(keys=[self._key(doc_id)], args=args, client=pipe)

    def finished(
        self, doc_id: str, phase: str, seconds: float, calls: int, next_phase: str | None,
        pipe: redis.client.Pipeline, cpu_s: float | None = None, gap_s: float | None = None,
        reused: bool = False,
    ) -> None:  # fmt: skip
        """Queue the writes that mark a phase finished on ``pipe``, the caller executes it; ``calls``:
        how many the handler made through ctx.gather and ctx.map; ``cpu_s``: the CPU seconds the
        worker process spent on it; ``gap_s``: its worker's time between the job before and this
        one, not waiting for it. A ``reused`` result counts as reused, not done, and adds nothing
        to the job metrics: `levers plan` measures the jobs that ran."""
        fields: dict[Any, str | float] = {f"{phase}:seconds": round(seconds, 4)}
        if reused:
            fields[f"{phase}:reused"] = 1
        if next_phase is None:
            now = time.time()
            fields.update(status=DocStatus.DONE, finished=now)
            # done: it waits for retention in the finished set, by when it finished
            pipe.zrem(keys.documents(self.pipeline), doc_id)
            pipe.zadd(keys.finished(self.pipeline), {doc_id: now})
        else:
            fields.update(status=DocStatus.QUEUED, phase=next_phase)
        pipe.hset(self._key(doc_id), mapping=fields)
        pipe.hdel(self._key(doc_id), f"{phase}:error", *([] if reused else [f"{phase}:reused"]))
        pipe.hincrby(keys.phase_counter(self.pipeline, phase), "reused" if reused else "done", 1)
        if not reused:
            metrics.record(pipe, self.pipeline, phase, "done", seconds, calls, cpu_s=cpu_s, gap_s=gap_s)

    def phase_finished(self, doc_id: str, phase: str) -> bool:
        """Whether an attempt of ``phase`` finished and handed the document on (or it is done)."""
        status, seconds = self.connection.hmget(self._key(doc_id), "status", f"{phase}:seconds")
        return seconds is not None or _text(status or b"") == DocStatus.DONE

    def attempt_failed(
        self, doc_id: str, phase: str, error: str, final: bool, seconds: float = 0.0,
        attempt: int | None = None, pipe: redis.client.Pipeline | None = None,
    ) -> bool:  # fmt: skip
        """Record a failed attempt; ``final`` when no retry follows, which fails the document.

        With ``attempt``, only while it is the current one: False, recording nothing, when it was
        superseded (its job taken over and run again elsewhere). With ``pipe``, a transaction the
        caller opened and executes, the writes are queued on it.
        """
        now = time.time()
        fields: dict[Any, str | float] = {f"{phase}:error": error}
        if final:
            fields.update(status=DocStatus.FAILED, error=f"{phase}: {error}", finished=now)
        else:
            fields.update(status=DocStatus.QUEUED)
        outcome = "failed" if final else "retried"

        def writes(pipe: redis.client.Pipeline) -> None:
            pipe.hset(self._key(doc_id), mapping=fields)
            if final:
                pipe.zadd(keys.failed(self.pipeline, phase), {doc_id: now})
            pipe.hincrby(keys.phase_counter(self.pipeline, phase), outcome, 1)
            metrics.record(pipe, self.pipeline, phase, outcome, seconds)

        if pipe is not None:
            writes(pipe)
            return True
        if attempt is None:
            with self.connection.pipeline() as own:
                writes(own)
                own.execute()
            return True

        def write(pipe: redis.client.Pipeline) -> None:
            pipe.multi()
            writes(pipe)

        try:
            self.commit_if_current(doc_id, phase, attempt, write)
        except Superseded:
            return False
        return True

    def get(self, doc_id: str) -> DocumentRecord | None:
        return self.get_many([doc_id])[0]

    def get_many(self, doc_ids: list[str]) -> list[DocumentRecord | None]:
        """Each document's record; for one whose record expired, a record saying only that it is
        done (``expired``); None for an unknown one."""
        if not doc_ids:
            return []
        with self.connection.pipeline() as pipe:
            for doc_id in doc_ids:
                pipe.hgetall(self._key(doc_id))
            pipe.smismember(keys.expired(self.pipeline), doc_ids)
            *rows, expired = pipe.execute()
        return [
            _record(doc_id, raw) if raw else _expired(doc_id) if gone else None
            for doc_id, raw, gone in zip(doc_ids, rows, expired, strict=True)
        ]

    def find(self, prefix: str) -> list[str]:
        """Ids of documents whose id starts with ``prefix`` (for `levers show` with a short id):
        not done, done, or done with their record expired."""
        if self.connection.exists(self._key(prefix)) or self.connection.sismember(
            keys.expired(self.pipeline), prefix
        ):
            return [prefix]
        pattern = f"{prefix}*"
        found = {
            _text(member)
            for zset in (keys.documents(self.pipeline), keys.finished(self.pipeline))
            for member, _score in self.connection.zscan_iter(zset, match=pattern, count=1000)
        }
        found.update(
            _text(m)
            for m in self.connection.sscan_iter(keys.expired(self.pipeline), match=pattern, count=1000)
        )
        return sorted(found)

    def kept_failed(self, phase: str, failed_ttl: float) -> int:
        """Failed documents kept at ``phase`` (for ``failed_ttl`` seconds; supervisors forget older
        ones, levers.documents.failures): one sorted-set count, cheap for `levers status`."""
        return int(
            self.connection.zcount(keys.failed(self.pipeline, phase), time.time() - failed_ttl, "+inf")
        )

    def totals(self, phase: str) -> dict[str, int]:
        raw = self.connection.hgetall(keys.phase_counter(self.pipeline, phase))
        return {_text(k): int(v) for k, v in raw.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _with_name(known: list[str], given: str) -> list[str]:
    """``known`` names with ``given`` added, within MAX_NAMES and MAX_NAMES_BYTES."""
    if given in known or len(known) >= MAX_NAMES:
        return known
    added = [*known, given]
    return added if not known or len(json.dumps(added).encode()) <= MAX_NAMES_BYTES else known


def _expired(doc_id: str) -> DocumentRecord:
    return DocumentRecord(doc_id, "", "files", DocStatus.DONE, "", 0.0, None, None, expired=True)


def _names(stored: bytes | str | None, name: str) -> list[str]:
    """The names a record keeps (JSON written by ``claim``; anything else in Redis is not trusted)."""
    try:
        names = json.loads(stored) if stored else []
    except ValueError:
        names = []
    if not isinstance(names, list):
        names = []
    kept = [n for n in names if isinstance(n, str)][:MAX_NAMES]
    return kept or ([name] if name else [])


def _version(fields: dict[str, str]) -> DocumentVersion | None:
    """The version a record names; None when it names none or not a valid one."""
    number = fields.get("version", "")
    if "version_of" not in fields or not number.isdigit():
        return None
    return DocumentVersion(fields["version_of"], int(number), fields.get("keep_versions") == "1")


def _record(doc_id: str, raw: dict[bytes | str, bytes | str]) -> DocumentRecord:
    fields = {_text(k): _text(v) for k, v in raw.items()}
    phases: dict[str, dict[str, str]] = {}
    for name, value in fields.items():
        phase, sep, attr = name.partition(":")
        if sep:
            phases.setdefault(phase, {})[attr] = value
    return DocumentRecord(
        id=doc_id,
        name=fields.get("name", ""),
        input=fields.get("input", "files"),
        status=DocStatus(fields.get("status", DocStatus.QUEUED)),
        phase=fields.get("phase", ""),
        submitted=float(fields.get("submitted", 0)),
        finished=float(fields["finished"]) if "finished" in fields else None,
        error=fields.get("error"),
        names=_names(fields.get("names"), fields.get("name", "")),
        priority=keys.stored_priority(fields.get("priority")),
        version=_version(fields),
        reuse=fields.get("reuse") != "no",
        phases={
            name: PhaseRecord(
                started=float(p["started"]) if "started" in p else None,
                seconds=float(p["seconds"]) if "seconds" in p else None,
                attempts=int(p.get("attempts", 0)),
                error=p.get("error"),
                lost=p.get("lost"),
                reused=p.get("reused") == "1",
            )
            for name, p in phases.items()
        },
    )
