"""The job every levers worker runs: one phase of one document, then the hand-off to the next.

Each job reads the phase's settings from pipeline.yaml as it is when the job starts (the last
valid version if an edit broke it), calls the handler, stores its output and enqueues the
document to ``next`` in the same Redis transaction that records the phase as finished. That
transaction commits only while the job's attempt is the document's current one, so a job run
twice (its host lost, then back) hands the document on once.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
import rq

from levers import keys, metrics
from levers.documents.ledger import DocumentRecord, Ledger, Superseded
from levers.documents.routing import enqueue_phase
from levers.documents.store import ArtifactStore
from levers.limits.shared import JobLimits
from levers.pipeline.loading import ensure_importable_from, import_handler, state_dir_of
from levers.pipeline.model import Phase, Pipeline
from levers.pipeline.options import phase_options
from levers.pipeline.watching import PipelineWatcher
from levers.server.connection import resolve
from levers.server.outage import UNREACHABLE
from levers.worker.phase_context import Document, Levers, PhaseContext

T = TypeVar("T")

# Longest error text kept per attempt: enough for a reason, not a whole traceback.
MAX_ERROR_CHARS = 500
# A job starts with pipeline.yaml as a look at most this old found it: levers' worker looks as it
# claims the job, moments before the job starts, and looking again would put a stat on the path
# between two handlers.
SETTINGS_MAX_AGE_S = 0.05


class PhaseError(Exception):
    """A job cannot run at all (its phase or document is gone)."""


class WorkerRuntime:
    """What the jobs of one worker process share: the live pipeline, Redis, store and pools."""

    def __init__(self, watcher: PipelineWatcher, connection: redis.Redis, url: str) -> None:
        self.watcher = watcher
        self.connection = connection
        # each job makes its own async client for ctx.limit from this, on the worker's event loop
        self.url = url
        self._executors: dict[int, ThreadPoolExecutor] = {}
        self._handlers: dict[str, Callable[..., Any]] = {}
        # per phase: the options as the file holds them, and what its handler gets for them
        self._options: dict[str, tuple[dict[str, Any], Any]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        # resolved once: resolving the path costs a stat per directory level, on every job
        self.state_dir = state_dir_of(watcher.path)
        ensure_importable_from(watcher.path.parent)

    def store(self, spec: Pipeline) -> ArtifactStore:
        return ArtifactStore(self.watcher.path.parent / spec.store)

    def executor(self, threads: int) -> ThreadPoolExecutor | None:
        """The process's thread pool for a threads lever; a changed lever gets a new pool."""
        if threads == 0:
            return None
        if threads not in self._executors:
            for stale in self._executors.values():
                stale.shutdown(wait=False)
            self._executors = {threads: ThreadPoolExecutor(threads, thread_name_prefix="levers")}
        return self._executors[threads]

    def run_async(self, job: Coroutine[Any, Any, T]) -> T:
        """Run a job's coroutine on the process's event loop, then cancel what it left running.

        One loop serves all the jobs of a process (a new loop per job costs about half a
        millisecond, and clients a handler keeps between jobs stay usable). A job that leaves the
        loop abnormally (its timeout's signal, say, can strike inside the loop's own code) takes
        the loop with it: the next job gets a new one.
        """
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        loop = self._loop
        try:
            result = loop.run_until_complete(job)
        except BaseException:
            self._loop = None
            _close(loop)
            raise
        _cancel_leftovers(loop)
        return result

    def handler(self, dotted: str) -> Callable[..., Any]:
        if dotted not in self._handlers:
            self._handlers[dotted] = import_handler(dotted)
        return self._handlers[dotted]

    def options(self, phase: str, settings: Phase) -> Any:
        """``ctx.options`` of a job of ``phase``: validated once per version of the file (the
        watcher checked them already, so this does not fail for a file it handed out)."""
        held = self._options.get(phase)
        if held is None or held[0] is not settings.options:
            held = self._options[phase] = (settings.options, phase_options(settings))
        return held[1]


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the tasks a job left on the loop, as asyncio.run would, and let them finish."""
    leftovers = asyncio.all_tasks(loop)
    for task in leftovers:
        task.cancel()
    if leftovers:
        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))


def _close(loop: asyncio.AbstractEventLoop) -> None:
    try:
        _cancel_leftovers(loop)
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


_runtime: WorkerRuntime | None = None


def install_runtime(runtime: WorkerRuntime) -> None:
    """Called by the worker before it takes jobs, so jobs share one runtime per process."""
    global _runtime
    _runtime = runtime


def current_runtime(connection: redis.Redis | None = None) -> WorkerRuntime:
    """The installed runtime; in a plain `rq worker`, one built from LEVERS_FILE or ./pipeline.yaml,
    on ``connection`` or else the current job's."""
    global _runtime
    if _runtime is None:
        job = rq.get_current_job()
        connection = connection or (job.connection if job is not None else None)
        if connection is None:
            raise PhaseError("run_phase runs inside an RQ worker")
        path = Path(os.environ.get("LEVERS_FILE", "pipeline.yaml"))
        watcher = PipelineWatcher.open(path)
        _runtime = WorkerRuntime(watcher, connection, resolve(watcher.current(), start=False).url)
    return _runtime


@dataclass(frozen=True)
class ClaimedPhase:
    """A phase job whose start the ledger has recorded, and the document its handler will get."""

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

    claimed: ClaimedPhase
    spec: Pipeline
    output: Any
    calls: int
    seconds: float


def run_phase(phase: str, doc_id: str) -> dict[str, Any]:
    """Run ``phase`` on document ``doc_id``; RQ calls this with the job's JSON arguments.

    levers' own worker runs the three steps below on its own, so that it can claim the next job
    and complete the last while a handler runs; this is the whole job in one call, for any worker.
    """
    runtime = current_runtime()
    try:
        claimed = claim_phase(runtime, phase, doc_id)
    except Superseded as exc:
        return superseded(phase, doc_id, exc)
    started = time.perf_counter()
    try:
        return complete_phase(runtime, perform_phase(runtime, claimed))
    except Superseded as exc:
        return superseded(phase, doc_id, exc)
    except Exception as exc:
        job = rq.get_current_job()
        final = job is None or not job.retries_left
        if not record_failure(runtime, claimed, exc, final, time.perf_counter() - started):
            return superseded(phase, doc_id, exc)
        raise


def superseded(phase: str, doc_id: str, reason: BaseException) -> dict[str, Any]:
    """The result of a job whose attempt another took over: it recorded nothing."""
    return {"document": doc_id, "phase": phase, "superseded": str(reason)}


def claim_phase(runtime: WorkerRuntime, phase: str, doc_id: str) -> ClaimedPhase:
    """Record the attempt's start in the ledger (one round trip) and read the document; raise
    Superseded for a copy of a job that ran already."""
    spec = runtime.watcher.current().spec
    record = Ledger(runtime.connection, spec.name).start(doc_id, phase)
    if record is None:
        raise PhaseError(f"document {doc_id} is unknown")
    try:
        return ClaimedPhase(phase, record, _document(runtime, spec, phase, record))
    except UNREACHABLE:
        raise  # the claim is given back, not the document failed
    except (PhaseError, OSError, ValueError, redis.RedisError) as exc:
        return ClaimedPhase(phase, record, None, exc)


def perform_phase(runtime: WorkerRuntime, claimed: ClaimedPhase) -> PerformedPhase:
    """Call the handler with the phase's settings as pipeline.yaml holds them now (a look at the
    file at most SETTINGS_MAX_AGE_S old)."""
    if claimed.doc is None:
        raise claimed.unreadable or PhaseError("the document could not be read")
    spec = runtime.watcher.current(SETTINGS_MAX_AGE_S).spec
    settings = spec.phases.get(claimed.phase)
    if settings is None:
        raise PhaseError(f"phase {claimed.phase!r} is no longer in pipeline.yaml")
    started = time.perf_counter()
    output, calls = _call_handler(runtime, spec, claimed.phase, settings, claimed.doc)
    return PerformedPhase(claimed, spec, output, calls, time.perf_counter() - started)


def complete_phase(runtime: WorkerRuntime, performed: PerformedPhase) -> dict[str, Any]:
    """Store the output and hand the document on; returns the job's result. Raises Superseded,
    storing and handing off nothing, when the job's attempt was taken over meanwhile."""
    claimed, spec = performed.claimed, performed.spec

    def store_output() -> None:
        try:
            runtime.store(spec).put_output(claimed.record.id, claimed.phase, performed.output)
        except (TypeError, ValueError) as exc:
            handler = spec.phases[claimed.phase].handler
            raise TypeError(f"the output of {handler} is not JSON-serialisable: {exc}") from None

    _hand_off(runtime.connection, spec, claimed, performed.seconds, performed.calls, store_output)
    return {"document": claimed.record.id, "phase": claimed.phase, "seconds": round(performed.seconds, 4)}


def record_failure(
    runtime: WorkerRuntime, claimed: ClaimedPhase, exc: BaseException, final: bool, seconds: float
) -> bool:
    """Record a failed attempt; ``final`` when RQ will not retry the job. False, recording
    nothing, when the attempt was taken over meanwhile."""
    spec = runtime.watcher.current().spec
    return Ledger(runtime.connection, spec.name).attempt_failed(
        claimed.record.id, claimed.phase, one_line(exc), final, seconds, claimed.attempt
    )


def release_claim(
    runtime: WorkerRuntime, phase: str, doc_id: str, pipe: redis.client.Pipeline, claimed_at: float,
    attempt: int | None = None,
) -> None:  # fmt: skip
    """Undo ``claim_phase`` on ``pipe``, for a job that goes back to its queue without having run
    or cut short: the attempt is taken back if a start at or after ``claimed_at`` was recorded
    (and, with ``attempt``, unless its attempt was taken over and started again elsewhere)."""
    ledger = Ledger(runtime.connection, runtime.watcher.current().spec.name)
    ledger.release_on(pipe, doc_id, phase, claimed_at, attempt)


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
    lever_values = Levers(settings.levers.workers, settings.levers.semaphore, settings.levers.threads)
    limits = JobLimits(spec, runtime.url)
    executor = runtime.executor(lever_values.threads)
    options = runtime.options(phase, settings)
    ctx = PhaseContext(phase, lever_values, options, runtime.state_dir, executor, limits, runtime.store(spec))
    if inspect.iscoroutinefunction(handler):
        output = runtime.run_async(_run_async(handler, doc, ctx, limits))
    else:
        output = handler(doc, ctx)
    return output, ctx.calls


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
        content = store.document_path(record.id, record.name)
    came_from = _came_from(store, record, feeders)
    prior = store.output(record.id, came_from) if came_from is not None else None
    return Document(id=record.id, name=record.name, content=content, input=prior)


def _came_from(store: ArtifactStore, record: DocumentRecord, feeders: list[str]) -> str | None:
    """The phase that handed the document on: of those feeding this one (routes can meet, as an
    upload phase and a file phase meet at chunking), the one with an output that started last."""
    done = [p for p in feeders if store.has_output(record.id, p)]

    def started(phase: str) -> float:
        state = record.phases.get(phase)
        return (state.started or 0.0) if state is not None else 0.0

    return max(done, key=started, default=None)


def _hand_off(
    connection: redis.Redis, spec: Pipeline, claimed: ClaimedPhase, seconds: float, calls: int,
    store_output: Callable[[], None],
) -> None:  # fmt: skip
    """Store the output, record the phase as finished and enqueue the next one, atomically and
    only while the job's attempt is the document's current one (else Superseded)."""
    phase, record = claimed.phase, claimed.record
    next_phase = spec.phases[phase].next
    if next_phase not in spec.phases:
        next_phase = None
    ledger = Ledger(connection, spec.name)

    def write(pipe: redis.client.Pipeline) -> None:
        # after the check: a superseded attempt must not overwrite the output the next phase reads
        store_output()
        # RQ opens the transaction (MULTI) itself, so its enqueue must come first
        if next_phase is not None:
            enqueue_phase(connection, spec, next_phase, record.id, record.name, pipeline=pipe)
        else:
            pipe.multi()
        ledger.finished(record.id, phase, seconds, next_phase, pipe)
        metrics.record(pipe, spec.name, phase, "done", seconds, calls)
        if record.input == "bytes" and not spec.feeders(phase):
            # in-memory documents live in Redis only until their entry phase has read them
            pipe.delete(keys.blob(spec.name, record.id))

    ledger.commit_if_current(record.id, phase, claimed.attempt, write)
