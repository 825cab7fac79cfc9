"""Running a batch: the jobs of one phase a worker took together (the phase's ``batch:``).

A batch handler (``levers.batch_handler``) is called once with every readable document of the
batch, under one job's timeout per document; a per-document handler is called on each in turn,
each under its own timeout, with one context, one pool and one shared-limit client for all.
Either way each document ends on its own: a handler's exception for one document (or a result
that is one) fails that document alone, and the others are handed on.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rq import Queue
from rq.job import _current_job
from rq.timeouts import BaseDeathPenalty, JobTimeoutException

from levers.limits.shared import JobLimits
from levers.pipeline.model import Phase, Pipeline
from levers.worker.jobs import (
    SETTINGS_MAX_AGE_S,
    PerformedPhase,
    PhaseError,
    StartedPhase,
    new_context,
    note_limits_used,
    reused_phase,
)
from levers.worker.phase_context import PhaseContext, is_batch_handler
from levers.worker.progress import WorkerProgress
from levers.worker.runtime import WorkerRuntime

if TYPE_CHECKING:
    from levers.worker.rq_take import Taken

# What a batch's document came to: the handler's result, or why it failed.
Ran = PerformedPhase | Exception
# A document's timeout: entered around the handler's work on document ``index`` of the batch (or,
# for a batch handler, around the one call, with the number of documents it holds).
Guard = Callable[[int, int], AbstractContextManager[None]]


class BatchResultError(TypeError):
    """A batch handler returned something other than one result per document."""


def run_batch(
    runtime: WorkerRuntime, batch: Sequence[Taken], penalty: type[BaseDeathPenalty], progress: WorkerProgress
) -> list[Ran]:
    """``perform_batch`` on the jobs of ``batch`` whose start the ledger recorded, each document's
    work under its job's timeout (``penalty``) and shown as running in ``progress``; the others
    fail with the reason the ledger gave."""
    started = [t for t in batch if t.phase is not None]

    @contextlib.contextmanager
    def guard(index: int, count: int) -> Iterator[None]:
        job = started[index].job
        progress.started(job.id)  # the one marked if the worker dies now
        current = _current_job.set(job)  # rq.get_current_job() works inside a handler
        try:
            with penalty((job.timeout or Queue.DEFAULT_TIMEOUT) * count, JobTimeoutException, job_id=job.id):
                yield
        finally:
            _current_job.reset(current)

    phases = [t.phase for t in started if t.phase is not None]
    performed = iter(perform_batch(runtime, phases, guard) if phases else [])
    return [next(performed) if t.phase is not None else (t.error or PhaseError("not started")) for t in batch]


def perform_batch(runtime: WorkerRuntime, batch: Sequence[StartedPhase], guard: Guard) -> list[Ran]:
    """Call the phase's handler on ``batch`` (one phase's started jobs); one outcome per job, in
    order. Documents that could not be read fail with their reason, without a handler call."""
    spec = runtime.watcher.current(SETTINGS_MAX_AGE_S).spec
    phase = batch[0].phase
    settings = spec.phases.get(phase)
    if settings is None:
        gone: Ran = PhaseError(f"phase {phase!r} is no longer in pipeline.yaml")
        return [gone] * len(batch)
    ran: list[Ran | None] = [
        None if s.doc is not None else (s.unreadable or PhaseError("the document could not be read"))
        for s in batch
    ]
    readable = [i for i, outcome in enumerate(ran) if outcome is None]
    # stored results stand in for handler calls, as for a job run alone (levers.worker.reuse)
    reuse_keys: dict[int, str | None] = {}
    for i in readable:
        doc = batch[i].doc
        assert doc is not None
        reuse_keys[i], ran[i] = reused_phase(runtime, spec, batch[i], settings, doc)
    readable = [i for i in readable if ran[i] is None]
    try:
        if readable:
            calls = _Calls(runtime, spec, phase, settings)
            try:
                # the guard is told each document's place in ``batch``, not among the readable ones
                outcomes = calls.run([batch[i] for i in readable], lambda j, n: guard(readable[j], n))
            finally:
                calls.close()
            for i, outcome in zip(readable, outcomes, strict=True):
                if isinstance(outcome, PerformedPhase):  # its result is kept under its key
                    outcome = replace(outcome, reuse_key=reuse_keys[i])
                ran[i] = outcome
    finally:
        for started in batch:
            if started.doc is not None and isinstance(started.doc.content, Path):
                runtime.store(spec).release(started.doc.content)  # a remote store's local copy goes
    return [outcome if outcome is not None else PhaseError("no outcome") for outcome in ran]


class _Calls:
    """The handler calls of one batch, on one set-up: context, pool, shared-limit client."""

    def __init__(self, runtime: WorkerRuntime, spec: Pipeline, phase: str, settings: Phase) -> None:
        self.runtime, self.spec, self.phase, self.settings = runtime, spec, phase, settings
        self.handler = runtime.handler(settings.handler)
        self.is_async = inspect.iscoroutinefunction(self.handler)
        self.used: set[str] = set()
        self._fresh()

    def _fresh(self) -> None:
        # again after a call that left the event loop abnormally (its timeout, say): the client and
        # semaphore of the last context belonged to that loop
        self.limits = JobLimits(self.spec, self.runtime.url)
        self.ctx: PhaseContext[Any] = new_context(
            self.runtime, self.spec, self.phase, self.settings, self.limits, self.used
        )

    def run(self, batch: Sequence[StartedPhase], guard: Guard) -> list[Ran]:
        if is_batch_handler(self.handler):
            return self._together(batch, guard)
        return [self._one(i, started, guard) for i, started in enumerate(batch)]

    def _call(self, arg: Any) -> Any:
        if not self.is_async:
            return self.handler(arg, self.ctx)
        try:
            return self.runtime.run_async(self.handler(arg, self.ctx))
        except BaseException:
            self._fresh()
            raise

    def _one(self, index: int, started: StartedPhase, guard: Guard) -> Ran:
        calls, began, cpu_began = self.ctx.calls, time.perf_counter(), time.process_time()
        try:
            with guard(index, 1):
                output = self._call(started.doc)
        except Exception as exc:
            return exc
        seconds, cpu_s = time.perf_counter() - began, time.process_time() - cpu_began
        return PerformedPhase(started, self.spec, output, self.ctx.calls - calls, seconds, cpu_s)

    def _together(self, batch: Sequence[StartedPhase], guard: Guard) -> list[Ran]:
        began, cpu_began = time.perf_counter(), time.process_time()
        try:
            with guard(0, len(batch)):
                outputs = self._call([started.doc for started in batch])
        except Exception as exc:
            failed: Ran = exc
            return [failed] * len(batch)
        if not isinstance(outputs, list | tuple) or len(outputs) != len(batch):
            got = f"{len(outputs)} results" if isinstance(outputs, list | tuple) else type(outputs).__name__
            error: Ran = BatchResultError(
                f"{self.settings.handler} returned {got} for {len(batch)} documents"
            )
            return [error] * len(batch)
        # the batch's time, CPU and calls are shared evenly by its documents, for status and plan
        share = len(batch)
        seconds = (time.perf_counter() - began) / share
        cpu_s = (time.process_time() - cpu_began) / share
        calls = self.ctx.calls // share
        return [
            output if isinstance(output, Exception) else PerformedPhase(started, self.spec, output, calls,
                                                                         seconds, cpu_s)
            for started, output in zip(batch, outputs, strict=True)
        ]  # fmt: skip

    def close(self) -> None:
        try:
            if self.is_async:
                with contextlib.suppress(Exception):  # a client that never connected, or a dead loop's
                    self.runtime.run_async(self.limits.aclose())
        finally:
            note_limits_used(self.runtime.connection, self.spec.name, self.phase, self.used)
