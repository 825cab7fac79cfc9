"""The job every levers worker runs: one phase of one document, then the hand-off to the next.

Each job reads the phase's settings from pipeline.yaml as it is when the job starts (the last
valid version if an edit broke it), calls the handler, stores its output and enqueues the
document to ``next`` (in the document's priority lane) in the same Redis transaction that records
the phase as finished. That
transaction commits only while the job's attempt is the document's current one, so a job run
twice (its host lost, then back) hands the document on once.

A job whose reuse key (levers.worker.reuse) has a stored result takes it instead of calling the
handler, unless the document was submitted with ``--no-reuse``; a job that calls it keeps its
result for the next one.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import rq

from levers import keys
from levers.documents.history import store_history
from levers.documents.ledger import DocumentRecord, Ledger, Superseded
from levers.documents.routing import enqueue_phase
from levers.documents.store import ArtifactStore
from levers.limits.shared import JobLimits, SharedLimit
from levers.pipeline.model import Phase, Pipeline
from levers.server.outage import UNREACHABLE
from levers.worker import reuse
from levers.worker.phase_context import Document, Levers, Permanent, PhaseContext
from levers.worker.runtime import WorkerRuntime, runtime_from_environment

# Longest error text kept per attempt: enough for a reason, not a whole traceback.
MAX_ERROR_CHARS = 500
# A job starts with pipeline.yaml as a look at most this old found it: levers' worker looks as it
# takes the job off its queue, moments before the job starts, and looking again would put a stat
# on the path between two handlers.
SETTINGS_MAX_AGE_S = 0.05
# A phase whose jobs stopped calling a shared limit this long ago is no longer capped by it.
LIMITS_USED_TTL_S = 3600


class PhaseError(Exception):
    """A job cannot run at all (its phase or document is gone)."""


# Runtimes of plain RQ workers (`rq worker`, no levers worker class), one per connection: such a
# worker has no place of its own to keep one between jobs.
_plain_runtimes: weakref.WeakKeyDictionary[redis.Redis, WorkerRuntime] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class StartedPhase:
    """A phase job whose attempt the ledger has recorded as started, and the document its
    handler will get."""

    phase: str
    record: DocumentRecord
    doc: Document | None
    unreadable: Exception | None = None  # why ``doc`` is None: the job fails with it when it runs

    @property
    def attempt(self) -> int:
        """Which attempt of the phase this is: the ledger's count when it started."""
        run = self.record.phases.get(self.phase)
        return run.attempts if run is not None else 0


@dataclass(frozen=True)
class PerformedPhase:
    """A handler's result, with the pipeline as it was when the handler started."""

    started: StartedPhase
    spec: Pipeline
    output: Any
    calls: int
    seconds: float
    # the worker process's CPU seconds while the handler ran, every thread counted: what the job
    # costs its host (with the hand-off of the job before, which runs meanwhile)
    cpu_s: float = 0.0
    # the worker's time between the job before and this one, waiting for it left out: what
    # taking and settling a job costs (None: not known)
    gap_s: float | None = None
    reuse_key: str | None = None  # the job's key (levers.worker.reuse); None: its result is not kept
    reused: bool = False  # ``output`` is a stored result: no handler ran


@dataclass(frozen=True)
class Settled:
    """How a job's attempt ended, as ``settle`` recorded it: ``result`` when it handed the document
    on, else ``error``; ``superseded`` when its attempt was taken over, so nothing was recorded."""

    result: dict[str, Any] | None = None
    error: BaseException | None = None
    superseded: Superseded | None = None


def run_phase(phase: str, doc_id: str) -> dict[str, Any]:
    """Run ``phase`` on document ``doc_id``: the job function RQ calls with the job's JSON
    arguments, in a worker other than levers' own (`rq worker`, say).

    levers' worker takes the same steps (``start_phase``, ``perform_phase``, ``settle``) apart,
    so that it can take the next job and settle the last while a handler runs.
    """
    job = rq.get_current_job()
    if job is None:
        raise PhaseError("run_phase runs inside an RQ worker")
    runtime = _plain_runtimes.get(job.connection)
    if runtime is None:
        runtime = _plain_runtimes[job.connection] = runtime_from_environment(job.connection)
    try:
        started = start_phase(runtime, phase, doc_id)
    except Superseded as exc:
        return superseded(phase, doc_id, exc)
    began = time.perf_counter()
    try:
        ran: PerformedPhase | Exception = perform_phase(runtime, started)
    except Exception as exc:
        ran = exc
    settled = settle(runtime, started, ran, gives_up(job, ran), time.perf_counter() - began)
    if settled.superseded is not None:
        return superseded(phase, doc_id, settled.superseded)
    if settled.error is not None:
        raise settled.error
    assert settled.result is not None
    return settled.result


def superseded(phase: str, doc_id: str, reason: BaseException) -> dict[str, Any]:
    """The result of a job whose attempt another took over: it recorded nothing."""
    return {"document": doc_id, "phase": phase, "superseded": str(reason)}


def start_phase(runtime: WorkerRuntime, phase: str, doc_id: str) -> StartedPhase:
    """Record the attempt's start in the ledger (one round trip) and read the document; raise
    Superseded for a copy of a job that ran already."""
    spec = runtime.watcher.current().spec
    record = Ledger(runtime.connection, spec.name).start(doc_id, phase)
    if record is None:
        raise PhaseError(f"document {doc_id} is unknown")
    try:
        return StartedPhase(phase, record, _document(runtime, spec, phase, record))
    except UNREACHABLE:
        raise  # the job goes back to its queue, not the document failed
    except (PhaseError, OSError, ValueError, redis.RedisError) as exc:
        return StartedPhase(phase, record, None, exc)


def perform_phase(runtime: WorkerRuntime, started: StartedPhase) -> PerformedPhase:
    """Call the handler with the phase's settings as pipeline.yaml holds them now (a look at the
    file at most SETTINGS_MAX_AGE_S old)."""
    if started.doc is None:
        raise started.unreadable or PhaseError("the document could not be read")
    spec = runtime.watcher.current(SETTINGS_MAX_AGE_S).spec
    settings = spec.phases.get(started.phase)
    if settings is None:
        raise PhaseError(f"phase {started.phase!r} is no longer in pipeline.yaml")
    began, cpu_began = time.perf_counter(), time.process_time()
    try:
        key, stored = reused_phase(runtime, spec, started, settings, started.doc)
        if stored is None:
            output, calls = _call_handler(runtime, spec, started.phase, settings, started.doc)
    finally:
        if isinstance(started.doc.content, Path):  # a remote store's local copy goes
            runtime.store(spec).release(started.doc.content)
    if stored is not None:
        return stored
    seconds, cpu_s = time.perf_counter() - began, time.process_time() - cpu_began
    return PerformedPhase(started, spec, output, calls, seconds, cpu_s, reuse_key=key)


def reused_phase(
    runtime: WorkerRuntime, spec: Pipeline, started: StartedPhase, settings: Phase, doc: Document
) -> tuple[str | None, PerformedPhase | None]:
    """The job's reuse key, and the job performed with the stored result that stands in for the
    handler's, if there is one: no call made, in the time the look-up took (a document submitted
    with --no-reuse takes none, but its jobs' results are kept all the same)."""
    began, cpu_began = time.perf_counter(), time.process_time()
    options = runtime.options(started.phase, settings)
    key = reuse.reuse_key(runtime.handler(settings.handler), settings.handler, options, doc)
    if key is None or not started.record.reuse:
        return key, None
    store = runtime.store(spec)
    ttl_s = reuse.entry_ttl_s(spec.retention)
    found, output = reuse.stored_result(runtime.connection, store, spec.name, started.phase, key, ttl_s)
    if not found:
        return key, None
    seconds, cpu_s = time.perf_counter() - began, time.process_time() - cpu_began
    return key, PerformedPhase(started, spec, output, 0, seconds, cpu_s, reuse_key=key, reused=True)


def settle(
    runtime: WorkerRuntime, started: StartedPhase, ran: PerformedPhase | BaseException, final: bool,
    seconds: float,
) -> Settled:  # fmt: skip
    """Record how the attempt ended: hand the document on (``ran`` is the handler's result), or
    record the failure (``ran`` is what the handler raised, after ``seconds``; ``final`` when RQ
    will not retry the job). A hand-off that fails (an output that is not JSON, say) is recorded
    as a failure. Only the document's current attempt records anything. A dropped connection is
    raised, nothing decided: the caller waits for the server and settles again."""
    if isinstance(ran, PerformedPhase):
        try:
            return Settled(result=complete_phase(runtime, ran))
        except Superseded as exc:
            return Settled(superseded=exc)
        except UNREACHABLE:
            raise
        except Exception as exc:
            seconds = ran.seconds
            ran = exc
    if not record_failure(runtime, started, ran, final, seconds):
        return Settled(error=ran, superseded=Superseded(f"attempt {started.attempt} was taken over"))
    return Settled(error=ran)


def complete_phase(runtime: WorkerRuntime, performed: PerformedPhase) -> dict[str, Any]:
    """Store the output and hand the document on; returns the job's result. Raises Superseded,
    storing and handing off nothing, when the job's attempt was taken over meanwhile."""
    started, spec = performed.started, performed.spec

    def store_output() -> str | None:
        store = runtime.store(spec)
        try:
            store.put_output(started.record.id, started.phase, performed.output)
        except (TypeError, ValueError) as exc:
            handler = spec.phases[started.phase].handler
            raise TypeError(f"the output of {handler} is not JSON-serialisable: {exc}") from None
        if spec.phases[started.phase].next not in spec.phases:  # the last phase: the document is done
            store_history(store, started.record, started.phase, performed.seconds, performed.reused)
        if performed.reuse_key is None or performed.reused:
            return None
        return reuse.keep_result(store, started.phase, performed.output)

    _hand_off(runtime.connection, spec, started, performed, store_output)
    return {"document": started.record.id, "phase": started.phase, "seconds": round(performed.seconds, 4)}


def gives_up(job: rq.job.Job | None, ran: object) -> bool:
    """Whether a failure (``ran``, what the handler raised) would be its job's last: RQ has no
    retry left for it, or the handler raised levers.Permanent (input no retry can fix), which
    takes the job's retries away so that RQ fails it at once, without the retries' waits."""
    if job is not None and isinstance(ran, Permanent):
        job.retries_left = 0
    return job is None or not job.retries_left


def record_failure(
    runtime: WorkerRuntime, started: StartedPhase, exc: BaseException, final: bool, seconds: float
) -> bool:
    """Record a failed attempt; ``final`` when RQ will not retry the job. False, recording
    nothing, when the attempt was taken over meanwhile."""
    spec = runtime.watcher.current().spec
    return Ledger(runtime.connection, spec.name).attempt_failed(
        started.record.id, started.phase, one_line(exc), final, seconds, started.attempt
    )


def take_back_start(
    runtime: WorkerRuntime, phase: str, doc_id: str, pipe: redis.client.Pipeline, taken_at: float,
    attempt: int | None = None,
) -> None:  # fmt: skip
    """Undo ``start_phase`` on ``pipe``, for a job that goes back to its queue without having run
    or cut short: the attempt is taken back if a start at or after ``taken_at`` (when the job was
    taken off its queue) was recorded (and, with ``attempt``, unless its attempt was taken over
    and started again elsewhere)."""
    ledger = Ledger(runtime.connection, runtime.watcher.current().spec.name)
    ledger.release_on(pipe, doc_id, phase, taken_at, attempt)


def one_line(exc: BaseException) -> str:
    """The exception as one short line: its type and the first line of its message."""
    if isinstance(exc, rq.timeouts.JobTimeoutException):
        return "timed out (raise the phase's timeout in pipeline.yaml if it needs longer)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line[:MAX_ERROR_CHARS]


def _call_handler(
    runtime: WorkerRuntime, spec: Pipeline, phase: str, settings: Phase, doc: Document
) -> tuple[Any, int]:
    """The handler's output, and how many calls it made through ctx.gather and ctx.map."""
    handler = runtime.handler(settings.handler)
    limits = JobLimits(spec, runtime.url)
    used: set[str] = set()
    ctx = new_context(runtime, spec, phase, settings, limits, used)
    try:
        if inspect.iscoroutinefunction(handler):
            output = runtime.run_async(_run_async(handler, doc, ctx, limits))
        else:
            output = handler(doc, ctx)
    finally:
        note_limits_used(runtime.connection, spec.name, phase, used)
    return output, ctx.calls


def new_context(
    runtime: WorkerRuntime, spec: Pipeline, phase: str, settings: Phase, limits: JobLimits, used: set[str]
) -> PhaseContext[Any]:
    """The ``ctx`` of a job of ``phase`` (or of a batch of them): its levers and options, the
    process's pool and store, and ``limits``, noting in ``used`` the names it gives out."""
    lever_values = Levers(settings.levers.workers, settings.levers.semaphore, settings.levers.threads)
    executor = runtime.executor(lever_values.threads)
    options = runtime.options(phase, settings)
    return PhaseContext(phase, lever_values, options, runtime.state_dir, executor, _noting(limits, used),
                        runtime.store(spec))  # fmt: skip


def _noting(limits: JobLimits, used: set[str]) -> Callable[[str], SharedLimit]:
    def limit(name: str) -> SharedLimit:
        found = limits(name)  # an undeclared name raises: it limits nothing
        used.add(name)
        return found

    return limit


def note_limits_used(connection: redis.Redis, pipeline: str, phase: str, used: set[str]) -> None:
    """Tell the supervisors which shared limits the phase calls: they cap its autoscaling. Kept
    for LIMITS_USED_TTL_S after the last such job; losing a note only loosens the cap a while."""
    if not used:
        return
    key = keys.phase_limits(pipeline, phase)
    with contextlib.suppress(redis.RedisError), connection.pipeline(transaction=False) as pipe:
        pipe.sadd(key, *sorted(used))
        pipe.expire(key, LIMITS_USED_TTL_S)
        pipe.execute()


async def _run_async(handler: Callable[..., Any], doc: Document, ctx: PhaseContext, limits: JobLimits) -> Any:
    try:
        return await handler(doc, ctx)
    finally:
        # the job's Redis client for ctx.limit ends with the job, not with the worker's loop
        await limits.aclose()


def _document(runtime: WorkerRuntime, spec: Pipeline, phase: str, record: DocumentRecord) -> Document:
    feeders = spec.feeders(phase)
    store = runtime.store(spec)
    content: bytes | Path
    if record.input == "bytes":
        # the bytes stay in Redis only until the entry phase has run
        blob = runtime.connection.get(keys.blob(spec.name, record.id)) if not feeders else b""
        content = blob if isinstance(blob, bytes) else b""
        if not feeders and not content:
            raise PhaseError("the document's bytes are gone from Redis; submit it again")
    else:
        content = store.document_file(record.id, record.name)
    came_from = _came_from(store, record, feeders)
    if feeders and came_from is None:  # a phase fed by others is never an entry: its input is missing
        raise PhaseError(
            f"no output of {' or '.join(feeders)} for this document in the artifact store {spec.store!r} "
            f"on {socket.gethostname()}: every host on this Redis must share one store: (an object "
            "store, or a directory they all mount)"
        )
    prior = store.output(record.id, came_from) if came_from is not None else None
    return Document(id=record.id, name=record.name, content=content, input=prior, version=record.version)


def _came_from(store: ArtifactStore, record: DocumentRecord, feeders: list[str]) -> str | None:
    """The phase that handed the document on: of those feeding this one (routes can meet, as an
    upload phase and a file phase meet at chunking), the one with an output that started last."""
    done = [p for p in feeders if store.has_output(record.id, p)]

    def started(phase: str) -> float:
        state = record.phases.get(phase)
        return (state.started or 0.0) if state is not None else 0.0

    return max(done, key=started, default=None)


def _hand_off(
    connection: redis.Redis, spec: Pipeline, started: StartedPhase, performed: PerformedPhase,
    store_output: Callable[[], str | None],
) -> None:  # fmt: skip
    """Store the output, record the phase as finished and enqueue the next one, atomically and
    only while the job's attempt is the document's current one (else Superseded). ``store_output``
    returns the hash of the result it kept for reuse, which the same transaction indexes."""
    phase, record = started.phase, started.record
    next_phase = spec.phases[phase].next
    if next_phase not in spec.phases:
        next_phase = None
    ledger = Ledger(connection, spec.name)

    def write(pipe: redis.client.Pipeline) -> None:
        # after the check: a superseded attempt must not overwrite the output the next phase reads
        kept = store_output()
        # RQ opens the transaction (MULTI) itself, so its enqueue must come first
        if next_phase is not None:
            enqueue_phase(
                connection, spec, next_phase, record.id, record.name, pipeline=pipe, priority=record.priority
            )
        else:
            pipe.multi()
        ledger.finished(
            record.id, phase, performed.seconds, performed.calls, next_phase, pipe, performed.cpu_s,
            performed.gap_s, reused=performed.reused,
        )  # fmt: skip
        if kept is not None and performed.reuse_key is not None:
            reuse.index_result(
                pipe, spec.name, phase, performed.reuse_key, kept, reuse.entry_ttl_s(spec.retention)
            )
        if record.input == "bytes" and not spec.feeders(phase):
            # in-memory documents live in Redis only until their entry phase has read them
            pipe.delete(keys.blob(spec.name, record.id))

    ledger.commit_if_current(record.id, phase, started.attempt, write)
