"""The RQ worker class levers runs: RQ's in-process SimpleWorker, with JSON payloads, fewer round
trips per job, and each job's bookkeeping done while the next handler runs.
"""

from __future__ import annotations

import _signal
import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from queue import SimpleQueue
from types import FrameType
from typing import Any, ClassVar

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job, _current_job
from rq.job_lifecycle import call_exception_handlers
from rq.serializers import JSONSerializer
from rq.suspension import is_suspended
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

from levers.documents.ledger import Superseded
from levers.safe import escape_logs
from levers.server.outage import UNREACHABLE
from levers.worker.guard import GuardedJob
from levers.worker.jobs import (
    PerformedPhase,
    complete_phase,
    current_runtime,
    perform_phase,
    record_failure,
    superseded,
)
from levers.worker.progress import WorkerProgress
from levers.worker.rq_claim import Claim, ClaimingWorker

log = logging.getLogger("levers.worker.process")

# A default-TTL heartbeat this soon after the last one is skipped (RQ's loop sends three per job).
HEARTBEAT_MIN_INTERVAL_S = 1.0
# A worker claims its next job while a handler runs only after a job shorter than this.
PREFETCH_AFTER_S = 1.0
# The courier's niceness above its worker's: on busy cores a handler's wake-up goes before
# bookkeeping that can wait (Linux, where a thread has a niceness of its own).
COURIER_NICENESS = 5


class JobTimeout(UnixSignalDeathPenalty):
    """RQ's SIGALRM job timeout, with its signal handler installed once and kept: RQ installs and
    removes it around every job, and each ``signal.signal`` call costs tens of microseconds in a
    worker that runs threads. It is installed again if other code replaced it.

    The check reads the handler with ``_signal.getsignal``: ``signal.getsignal`` first tries to
    turn it into an enum member, which for a Python function fails through an exception, about
    100 µs between two handlers.
    """

    _armed: ClassVar[JobTimeout | None] = None

    def setup_death_penalty(self) -> None:
        if _signal.getsignal(signal.SIGALRM) is not JobTimeout._on_alarm:
            signal.signal(signal.SIGALRM, JobTimeout._on_alarm)
        JobTimeout._armed = self
        signal.alarm(self._timeout)

    def cancel_death_penalty(self) -> None:
        signal.alarm(0)
        JobTimeout._armed = None

    @staticmethod
    def _on_alarm(signum: int, frame: FrameType | None) -> None:
        armed = JobTimeout._armed
        if armed is not None:  # else it struck just as its job ended
            armed.handle_death_penalty(signum, frame)


class Courier:
    """The worker's helper thread: it runs the steps it is handed, in order.

    A step handed with ``ask`` sends its result (or its exception) back to ``answer``; one asked
    step at a time. Plain queues, not an executor: the hand-over lies on the path between two
    handlers, where every line of code touched costs.
    """

    def __init__(self) -> None:
        self._inbox: SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], bool] | None] = SimpleQueue()
        self._answers: SimpleQueue[tuple[Any, Exception | None]] = SimpleQueue()
        # a daemon so that a worker dying without teardown() does not hang on it at exit
        self._thread = threading.Thread(target=self._serve, name="levers-courier", daemon=True)
        self._thread.start()

    def send(self, step: Callable[..., Any], *args: Any) -> None:
        self._inbox.put((step, args, False))

    def ask(self, step: Callable[..., Any], *args: Any) -> None:
        self._inbox.put((step, args, True))

    def answer(self) -> Any:
        """The asked step's result once it ran; what it raised is raised here."""
        result, error = self._answers.get()
        if error is not None:
            raise error
        return result

    def stop(self) -> None:
        """Once every step handed over has run."""
        self._inbox.put(None)
        self._thread.join()

    def _serve(self) -> None:
        if sys.platform == "linux":
            with contextlib.suppress(OSError):
                niceness = os.getpriority(os.PRIO_PROCESS, 0) + COURIER_NICENESS
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        while (item := self._inbox.get()) is not None:
            step, args, asked = item
            try:
                result = step(*args)
            except Exception as exc:
                if asked:
                    self._answers.put((None, exc))
                else:
                    log.exception("the worker's courier failed at %s", getattr(step, "__name__", step))
                continue
            if asked:
                self._answers.put((result, None))


class LeversWorker(ClaimingWorker):
    """RQ's in-process worker with JSON payloads, fewer round trips per job, and its bookkeeping
    done while the handlers wait.

    RQ's loop does everything one step after another: dequeue, register, run, record the result,
    dequeue again. Here a helper thread (the courier) completes each job (output, hand-off, RQ's
    result and registries) and claims the next one while the following handler runs, so between
    two handlers the worker only takes the claim from the courier. The next job is claimed ahead
    only after a job shorter than ``PREFETCH_AFTER_S``: a claimed job waits behind the running
    one, which after a long job could keep it from another worker that is free. Handlers still
    run one at a time, on the main thread, under RQ's timeout.

    Round trips: RQ's work loop calls ``heartbeat()`` three times per job, each sending HSET,
    EXPIRE and EXPIRE in three round trips, and writes the idle state twice. Here a heartbeat is
    one round trip, a default-TTL heartbeat within a second of the last one is skipped, and an
    unchanged state is not written again.

    It runs only levers' own jobs (see levers.worker.guard), read as JSON whatever serializer or job
    class it is given (`rq worker` passes pickle unless told otherwise). A second stop signal
    (RQ's cold shutdown) puts the running job back at the head of its queue, its attempt taken
    back, before the worker exits. ``progress`` is shared with the supervisor.
    """

    _last_default_beat = float("-inf")
    # False runs each job's steps one after another, as RQ does (the benchmark's baseline)
    overlap = True
    # RQ's fourth log line per job ("result is kept for N seconds") says the same every time
    log_result_lifespan = False
    death_penalty_class = JobTimeout
    job_class = GuardedJob

    def __init__(
        self, queues: Any, *args: Any, progress: WorkerProgress | None = None, **kwargs: Any
    ) -> None:
        given = list(queues) if isinstance(queues, list | tuple) else [queues]
        if kwargs.get("connection") is None:
            kwargs["connection"] = next((q.connection for q in given if isinstance(q, Queue)), None)
        # queues by name: RQ makes them again with this serializer and job class, which its registry
        # cleanups then use too (a failure callback of a job found there is resolved by them)
        kwargs.update(serializer=JSONSerializer, job_class=self.job_class)
        super().__init__([q.name if isinstance(q, Queue) else q for q in given], *args, **kwargs)
        self.progress = progress or WorkerProgress()
        self._cold_stop = False  # a second stop signal is cutting the running job short
        self._courier: Courier | None = None
        self._claiming = False  # the courier is claiming the next job (its answer not yet taken)
        self._held: Claim | None = None  # a claim taken from the courier that has not run yet
        self._outcome: Callable[[], None] | None = None  # the last job's completion, not yet handed over
        self._last_job_s = math.inf

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)  # where RQ sets up its log handlers if nobody did
        escape_logs(logging.getLogger(), logging.getLogger("rq.worker"), logging.getLogger("rq.job"))

    def heartbeat(self, timeout: int | None = None, pipeline: redis.client.Pipeline | None = None) -> None:
        if timeout is not None and timeout > self.worker_ttl + 60:
            # a job's longer TTL: the next default heartbeat must go out, to shorten it again
            self._last_default_beat = float("-inf")
            super().heartbeat(timeout, pipeline)
            return
        now = time.monotonic()
        if pipeline is None and now - self._last_default_beat < HEARTBEAT_MIN_INTERVAL_S:
            return
        if pipeline is None and self._claim_ahead():
            return  # claiming it beat for this worker, with the next job's TTL
        self._last_default_beat = now
        if pipeline is not None:
            super().heartbeat(timeout, pipeline)
            return
        self.outage.call(self._beat, timeout)

    def _beat(self, timeout: int | None) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            super().heartbeat(timeout, pipe)
            pipe.execute()

    @property
    def stopping(self) -> bool:
        """A stop was asked for (the running job, if any, finishes first)."""
        return self._shutdown_requested_date is not None

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        # RQ raises SystemExit wherever the main thread is; _run gives back the job it cuts short
        self._cold_stop = True
        super().request_force_stop(signum, frame)
        self._cold_stop = False  # RQ ignored it: a duplicate of the first signal

    def set_state(self, state: str, pipeline: redis.client.Pipeline | None = None) -> None:
        # only this worker writes its state, so the one it last wrote is the one Redis holds
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    def check_for_suspension(self, burst: bool) -> None:
        if not self._claim_ahead():  # else the courier checked before it claimed
            super().check_for_suspension(burst)

    def _claim_ahead(self) -> bool:
        return self._claiming or self._held is not None

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        claim = self._take_next()
        if self._stop_requested:
            raise StopRequested()  # a claim taken here goes back to its queue in teardown()
        if claim is not None:
            return claim.job, claim.queue
        self._hand_over_outcome()  # the courier found no job to claim ahead
        return self.wait_for_job(timeout)

    def execute_job(self, job: Job, queue: Queue) -> None:
        claim, self._held = self._held, None
        if claim is None:
            claim = self._claim(job, queue)
        if claim is None:  # refused, or it went back to its queue
            self._hand_over_outcome()
            return
        if self.overlap and not self._stop_requested and self._last_job_s < PREFETCH_AFTER_S:
            # one hand-over for the last job's completion and the next claim: each wakes the courier
            outcome, self._outcome = self._outcome, None
            self._courier_started().ask(self._claim_next, outcome)
            self._claiming = True
        else:
            self._hand_over_outcome()
        started = time.monotonic()
        self._run(claim)
        self._last_job_s = time.monotonic() - started
        if not self._claiming:  # no claim to hand the outcome over with
            self._hand_over_outcome()
            self.set_state(WorkerStatus.IDLE)

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # RQ puts the traceback in the message, which the log keeps on one line; as exc_info it
        # keeps its lines, each indented under the record
        self.log.error("Worker %s: job %s failed", self.name, job.id, exc_info=exc_info)
        call_exception_handlers(self._exc_handlers, job, *exc_info)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # the job ended when its handler returned, not when the courier got to its bookkeeping
        ended = job.ended_at
        super().handle_execution_ended(job, queue, heartbeat_ttl)
        job.ended_at = ended or job.ended_at

    def teardown(self) -> None:
        self._hand_over_outcome()
        if self._courier is not None:
            with contextlib.suppress(Exception):  # _take_next logged it
                self._take_next()
            if self._held is not None:
                self._release(self._held, "this worker stops before running it")
                self._held = None
            self._courier.stop()  # the last jobs' bookkeeping completes
            self._courier = None
        super().teardown()

    def _courier_started(self) -> Courier:
        # made on first use, in the worker process: threads do not survive the fork
        if self._courier is None:
            self._courier = Courier()
        return self._courier

    def _take_next(self) -> Claim | None:
        """The courier's claim, once made; it is held until it runs (or goes back in teardown)."""
        if not self._claiming:
            return None
        try:
            self._held = self._courier_started().answer()
        except Exception:
            # a job half-claimed (moved off its queue) goes back by the supervisor's look
            log.exception("claiming the next job failed; dequeueing the usual way")
        # not when a cold stop strikes while waiting: teardown() then takes the claim and gives it back
        self._claiming = False
        return self._held

    def _hand_over_outcome(self) -> None:
        if self._outcome is not None:
            self._courier_started().send(self._outcome)
            self._outcome = None

    def _claim_next(self, outcome: Callable[[], None] | None = None) -> Claim | None:
        """On the courier: complete the last job (``outcome``), then claim the next one if one is
        waiting (never blocks: a free worker, blocked on the queue, is given new jobs first) and
        register it as this worker's; none while `rq suspend` holds."""
        if outcome is not None:
            outcome()
        if self.outage.call(is_suspended, self.connection, self):
            return None
        try:
            found = self.queue_class.dequeue_any(
                self._ordered_queues, None, connection=self.connection, job_class=self.job_class,
                serializer=self.serializer, death_penalty_class=self.death_penalty_class,
            )  # fmt: skip
        except UNREACHABLE as exc:
            self.outage.wait(exc)  # a job the lost reply moved goes back by the supervisor's look
            return None
        if found is None:
            return None
        job, queue = found
        job.redis_server_version = self.outage.call(self.get_redis_server_version)
        self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
        return self._claim(job, queue)

    def _run(self, claim: Claim) -> None:
        """Run the job's handler here; its completion goes to the courier."""
        job = claim.job
        job.started_at = now()
        started = time.perf_counter()
        if isinstance(claim.error, Superseded):
            # a copy of a job that ran already: it finishes at once, having recorded nothing
            job.ended_at = now()
            result = superseded(str(job.args[0]), str(job.args[1]), claim.error)
            self._after(
                claim, lambda again: self._finalize_success(job, claim.queue, claim.execution, result)
            )
            return
        self.progress.started(job.id)
        try:
            if claim.error is not None:
                raise claim.error
            with self.death_penalty_class(
                job.timeout or Queue.DEFAULT_TIMEOUT, JobTimeoutException, job_id=job.id
            ):
                result = self._perform(claim)
        except Exception:
            self.progress.ended()
            job.ended_at = now()
            exc_info, seconds = sys.exc_info(), time.perf_counter() - started
            self._after(claim, lambda again: self._fail(claim, exc_info, seconds, again))
            return
        except BaseException:
            if self._cold_stop:
                self.progress.ended()
                with contextlib.suppress(Exception):  # what stays registered, the supervisor requeues
                    self._release(claim, "a second stop signal cut it short")
            raise
        self.progress.ended()
        job.ended_at = now()
        self._after(claim, lambda again: self._complete(claim, result, again))

    @staticmethod
    def _perform(claim: Claim) -> Any:
        assert claim.phase is not None  # a claim without one carries the error _run raised
        # rq.get_current_job() works inside a handler, as in the jobs RQ's own perform() runs
        current = _current_job.set(claim.job)
        try:
            return perform_phase(current_runtime(), claim.phase)
        finally:
            _current_job.reset(current)

    def _after(self, claim: Claim, outcome: Callable[[bool], None]) -> None:
        # RQ runs callbacks under a SIGALRM timeout, which only the main thread can set
        callbacks = claim.job.success_callback or claim.job.failure_callback
        if not self.overlap or callbacks:
            self._deliver(claim, outcome)
            return

        def logged() -> None:
            try:
                self._deliver(claim, outcome)
            except Exception:
                log.exception("recording the outcome of job %s failed", claim.job.id)

        self._outcome = logged  # handed over with the next claim, or at once if there is none

    def _deliver(self, claim: Claim, outcome: Callable[[bool], None]) -> None:
        """Record a job's outcome (``outcome(again)``). When the connection drops, wait for the
        server and record it again (``again``), unless the last try got through: RQ's part, last,
        takes the job's execution out of the started registry."""
        again = False
        retries_left = claim.job.retries_left  # RQ counts one down on the job as it records a failure
        while True:
            try:
                if not again or self._registered(claim):
                    outcome(again)
                return
            except UNREACHABLE as exc:
                self.outage.wait(exc)
                again = True
                claim.job.retries_left = retries_left

    def _registered(self, claim: Claim) -> bool:
        registry = claim.queue.started_job_registry.key
        return self.connection.zscore(registry, claim.execution.composite_key) is not None

    def _complete(self, claim: Claim, result: Any, again: bool) -> None:
        if isinstance(result, PerformedPhase):
            try:
                result = complete_phase(current_runtime(), result)
            except Superseded as exc:
                # after a dropped connection, the hand-off may be this worker's own, made before it
                self._drop(
                    claim, Superseded(f"{exc}, or handed on before the connection dropped") if again else exc
                )
                return
            except UNREACHABLE:
                raise
            except Exception:
                self._fail(claim, sys.exc_info(), result.seconds, again)
                return
        self._finalize_success(claim.job, claim.queue, claim.execution, result)

    def _fail(self, claim: Claim, exc_info: Any, seconds: float, again: bool) -> None:
        if claim.phase is not None:
            final = not claim.job.retries_left
            recorded = record_failure(current_runtime(), claim.phase, exc_info[1], final, seconds)
            # after a dropped connection, a superseded attempt may be this worker's own failure
            # record, made before it: RQ's part (the retry) still has to be
            if not recorded and not again:
                self._drop(claim, Superseded(f"attempt {claim.phase.attempt} was taken over"))
                return
        self._finalize_failure(claim.job, claim.queue, claim.execution, exc_info)
        if self._registered(claim):  # RQ logs a failure it could not write, and goes on
            self.connection.ping()  # with the server away, the failure is recorded again once it is back

    def _drop(self, claim: Claim, reason: Superseded) -> None:
        """Let go of a job whose attempt was taken over (its host was thought lost): the job runs
        again elsewhere, or ran, so only this worker's own execution of it is cleaned up."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(claim.job, pipe, claim.execution)
            pipe.execute()
        log.warning("job %s: %s; this worker's outcome is dropped", claim.job.id, reason)
