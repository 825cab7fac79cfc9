"""The RQ worker class levers runs: RQ's in-process SimpleWorker, with JSON payloads, fewer round
trips per job, and each job settled while the next handler runs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import replace
from types import FrameType
from typing import Any

import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job, _current_job
from rq.job_lifecycle import call_exception_handlers
from rq.serializers import JSONSerializer
from rq.suspension import is_suspended
from rq.timeouts import JobTimeoutException
from rq.utils import now
from rq.worker import WorkerStatus

from levers import keys
from levers.documents.lanes import LaneQueue
from levers.documents.ledger import Superseded
from levers.safe import escape_logs
from levers.server.outage import UNREACHABLE
from levers.worker.batching import run_batch
from levers.worker.courier import Courier
from levers.worker.guard import GuardedJob
from levers.worker.jobs import PerformedPhase, Settled, gives_up, perform_phase, settle, superseded
from levers.worker.progress import WorkerProgress
from levers.worker.rq_take import Taken, TakingWorker
from levers.worker.rq_timeout import JobTimeout

log = logging.getLogger("levers.worker.process")

# A default-TTL heartbeat this soon after the last one is skipped (RQ's loop sends three per job).
HEARTBEAT_MIN_INTERVAL_S = 1.0
# A worker takes its next job while a handler runs only after a job shorter than this.
PREFETCH_AFTER_S = 1.0
# Time between two jobs beyond this is a pause (a suspension), not what a job costs its worker.
MAX_GAP_S = 10.0


class LeversWorker(TakingWorker):
    """RQ's in-process worker with JSON payloads, fewer round trips per job, and its bookkeeping
    done while the handlers wait.

    RQ's loop does everything one step after another: dequeue, register, run, record the result,
    dequeue again. Here a helper thread (the courier) settles each job (output, hand-off or failure
    record, RQ's result and registries) and takes the next one off the queue while the following
    handler runs, so between two handlers the worker only collects the next job from the courier.
    The next job is taken ahead only after a job shorter than ``PREFETCH_AFTER_S``: a job taken
    ahead waits behind the running one, which after a long job could keep it from another worker
    that is free. Handlers still run one at a time, on the main thread, under RQ's timeout.

    The job's own steps are levers.worker.jobs's (``start_phase``, ``perform_phase``, ``settle``),
    the same that ``run_phase`` takes one after another in any other RQ worker; ``runtime`` (see
    TakingWorker) is what they share.

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
        kwargs.update(serializer=JSONSerializer, job_class=self.job_class, queue_class=LaneQueue)
        # a phase's job may be in any of its lanes: a worker given one serves them all
        names = [q.name if isinstance(q, Queue) else str(q) for q in given]
        lanes = [lane for name in names for lane in keys.sibling_lanes(name)]
        super().__init__(list(dict.fromkeys(lanes)), *args, **kwargs)
        self.progress = progress or WorkerProgress()
        self._cold_stop = False  # a second stop signal is cutting the running job short
        self._courier: Courier | None = None
        self._taking = False  # the courier is taking the next job (its answer not yet collected)
        self._held: Taken | None = None  # a job collected from the courier that has not run yet
        self._outcome: Callable[[], None] | None = None  # the last job's settling, not yet handed over
        self._last_job_s = math.inf
        # the time between jobs: since the last handler returned, and of that the time spent
        # waiting for a job (what is left is what taking and settling a job cost this worker)
        self._free_since: float | None = None
        self._waited_s = 0.0

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
        if pipeline is None and self._taking_ahead():
            return  # taking it beat for this worker, with the next job's TTL
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
        if not self._taking_ahead():  # else the courier checked before it took the job
            super().check_for_suspension(burst)

    def _taking_ahead(self) -> bool:
        return self._taking or self._held is not None

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        taken = self._collect()
        if self._stop_requested:
            raise StopRequested()  # a job collected here goes back to its queue in teardown()
        if taken is not None:
            return taken.job, taken.queue
        self._hand_over_outcome()  # the courier found no job to take ahead
        waiting = time.monotonic()
        try:
            return self.wait_for_job(timeout)
        finally:
            self._waited_s += time.monotonic() - waiting

    def execute_job(self, job: Job, queue: Queue) -> None:
        taken, self._held = self._held, None
        if taken is not None and self.overtaken(taken):
            taken = self._overtake(taken)
        elif taken is None:
            taken = self._take(job, queue)
        if taken is None:  # refused, or it went back to its queue
            self._hand_over_outcome()
            return
        if self.batching(taken):
            self._run_batch([taken, *self.take_rest(taken)])
            return
        if self.overlap and not self._stop_requested and self._last_job_s < PREFETCH_AFTER_S:
            # one hand-over for settling the last job and taking the next: each wakes the courier
            outcome, self._outcome = self._outcome, None
            self._courier_started().ask(self._take_ahead, outcome)
            self._taking = True
        else:
            self._hand_over_outcome()
        started = time.monotonic()
        self._run(taken)
        self._last_job_s = time.monotonic() - started
        if not self._taking:  # no take to hand the outcome over with
            self._hand_over_outcome()
            self.set_state(WorkerStatus.IDLE)

    def _overtake(self, taken: Taken) -> Taken | None:
        """Give back ``taken``, a lower job taken ahead, for the high one that came in since, and
        take the next job: the high one, unless another worker was quicker."""
        self._release(taken, "a high-priority job came in before it ran")
        found = self.outage.call(self.dequeue, None)
        return self._take(*found) if found is not None else None

    def handle_exception(self, job: Job, *exc_info: Any) -> None:
        # one line says what failed; the traceback (its lines indented under the record) with -v
        then = f"retrying ({job.retries_left} left)" if job.retries_left else "no retry left"
        log.warning("job failed: %s: %s; %s", job.description or job.id, first_line(exc_info[1]), then)
        self.log.info("Worker %s: job %s failed", self.name, job.id, exc_info=exc_info)
        call_exception_handlers(self._exc_handlers, job, *exc_info)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # the job ended when its handler returned, not when the courier got to settling it
        ended = job.ended_at
        super().handle_execution_ended(job, queue, heartbeat_ttl)
        job.ended_at = ended or job.ended_at

    def teardown(self) -> None:
        self._hand_over_outcome()
        if self._courier is not None:
            with contextlib.suppress(Exception):  # _collect logged it
                self._collect()
            if self._held is not None:
                self._release(self._held, "this worker stops before running it")
                self._held = None
            self._courier.stop()  # the last jobs are settled
            self._courier = None
        super().teardown()

    def _courier_started(self) -> Courier:
        # made on first use, in the worker process: threads do not survive the fork
        if self._courier is None:
            self._courier = Courier()
        return self._courier

    def _collect(self) -> Taken | None:
        """The job the courier took ahead, once taken; it is held until it runs (or goes back in
        teardown)."""
        if not self._taking:
            return None
        try:
            self._held = self._courier_started().answer()
        except Exception:
            # a job half-taken (moved off its queue) goes back by the supervisor's look
            log.exception("taking the next job failed; dequeueing the usual way")
        # not when a cold stop strikes while waiting: teardown() then collects the job and gives it back
        self._taking = False
        return self._held

    def _hand_over_outcome(self) -> None:
        if self._outcome is not None:
            self._courier_started().send(self._outcome)
            self._outcome = None

    def _take_ahead(self, outcome: Callable[[], None] | None = None) -> Taken | None:
        """On the courier: settle the last job (``outcome``), then take the next one off the queue
        if one is waiting (never blocks: a free worker, blocked on the queue, is given new jobs
        first) and register it as this worker's; none while `rq suspend` holds."""
        if outcome is not None:
            outcome()
        if self.outage.call(is_suspended, self.connection, self):
            return None
        try:
            found = self.dequeue(None)
        except UNREACHABLE as exc:
            self.outage.wait(exc)  # a job the lost reply moved goes back by the supervisor's look
            return None
        if found is None:
            return None
        job, queue = found
        job.redis_server_version = self.outage.call(self.get_redis_server_version)
        self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
        taken = self._take(job, queue)
        if taken is not None:
            taken.overtakable = keys.lane_of(queue.name)[1] != keys.LANES[0] and not self._for_share
        return taken

    def _run(self, taken: Taken) -> None:
        """Run the job's handler here; settling it goes to the courier."""
        job = taken.job
        job.started_at = now()
        if isinstance(taken.error, Superseded):
            # a copy of a job that ran already: it finishes at once, having recorded nothing
            job.ended_at = now()
            result = superseded(str(job.args[0]), str(job.args[1]), taken.error)
            self._after(
                taken, lambda again: self._finalize_success(job, taken.queue, taken.execution, result)
            )
            return
        self.progress.started(job.id)
        gap_s = self._gap_s()
        began = time.perf_counter()
        ran: Any
        try:
            if taken.error is not None:
                raise taken.error
            with self.death_penalty_class(
                job.timeout or Queue.DEFAULT_TIMEOUT, JobTimeoutException, job_id=job.id
            ):
                ran = self._perform(taken)
            if isinstance(ran, PerformedPhase):
                ran = replace(ran, gap_s=gap_s)
        except Exception as exc:
            ran = exc
        except BaseException:
            if self._cold_stop:
                self.progress.ended()
                with contextlib.suppress(Exception):  # what stays registered, the supervisor requeues
                    self._release(taken, "a second stop signal cut it short")
            raise
        seconds = time.perf_counter() - began
        self._free_since = time.monotonic()
        self.progress.ended()
        job.ended_at = now()
        self._after(taken, lambda again: self._settle(taken, ran, seconds, again))

    def _gap_s(self) -> float | None:
        """The time since the last job's handler returned that was not spent waiting for this
        job; None for a worker's first job, or after a pause too long to be a job's cost (a
        suspension)."""
        free_since, waited_s = self._free_since, self._waited_s
        self._free_since, self._waited_s = None, 0.0
        if free_since is None:
            return None
        gap_s = time.monotonic() - free_since - waited_s
        return gap_s if 0 <= gap_s <= MAX_GAP_S else None

    def _run_batch(self, batch: list[Taken]) -> None:
        """Run a batch's handler calls here (levers.worker.batching); settling them goes to the
        courier, which records the last batch while this one runs and this one while the next
        batch is taken."""
        self._hand_over_outcome()
        runnable = []
        for taken in batch:
            if isinstance(taken.error, Superseded):
                self._run(taken)  # a copy of a job that ran already finishes at once
                self._hand_over_outcome()
            else:
                taken.job.started_at = now()
                runnable.append(taken)
        gap_s = self._gap_s()
        began = time.perf_counter()
        try:
            outcomes = run_batch(self.runtime, runnable, self.death_penalty_class, self.progress)
        except BaseException:
            self.progress.ended()
            if self._cold_stop:
                for taken in runnable:
                    with contextlib.suppress(Exception):  # what stays registered, the supervisor requeues
                        self._release(taken, "a second stop signal cut it short")
            raise
        self.progress.ended()
        self._free_since = time.monotonic()
        seconds = (time.perf_counter() - began) / max(1, len(runnable))
        if gap_s is not None:  # taking the batch was the cost of each of its jobs in part
            outcomes = [replace(o, gap_s=gap_s / len(runnable)) if isinstance(o, PerformedPhase) else o
                        for o in outcomes]  # fmt: skip

        def settle(taken: Taken, ran: Any) -> None:
            try:
                self._deliver(taken, lambda again: self._settle(taken, ran, seconds, again))
            except Exception:
                log.exception("recording the outcome of job %s failed", taken.job.id)

        def settle_all() -> None:
            for taken, ran in zip(runnable, outcomes, strict=True):
                settle(taken, ran)

        for taken in runnable:
            taken.job.ended_at = now()
        # RQ runs callbacks under a SIGALRM timeout, which only the main thread can set
        if self.overlap and not any(t.job.success_callback or t.job.failure_callback for t in runnable):
            self._outcome = settle_all
        else:
            settle_all()
        self.set_state(WorkerStatus.IDLE)

    def _perform(self, taken: Taken) -> Any:
        assert taken.phase is not None  # a job taken without one carries the error _run raised
        # rq.get_current_job() works inside a handler, as in the jobs RQ's own perform() runs
        current = _current_job.set(taken.job)
        try:
            return perform_phase(self.runtime, taken.phase)
        finally:
            _current_job.reset(current)

    def _after(self, taken: Taken, outcome: Callable[[bool], None]) -> None:
        # RQ runs callbacks under a SIGALRM timeout, which only the main thread can set
        callbacks = taken.job.success_callback or taken.job.failure_callback
        if not self.overlap or callbacks:
            self._deliver(taken, outcome)
            return

        def logged() -> None:
            try:
                self._deliver(taken, outcome)
            except Exception:
                log.exception("recording the outcome of job %s failed", taken.job.id)

        self._outcome = logged  # handed over with the next take, or at once if there is none

    def _deliver(self, taken: Taken, outcome: Callable[[bool], None]) -> None:
        """Record a job's outcome (``outcome(again)``). When the connection drops, wait for the
        server and record it again (``again``), unless the last try got through: RQ's part, last,
        takes the job's execution out of the started registry."""
        again = False
        retries_left = taken.job.retries_left  # RQ counts one down on the job as it records a failure
        while True:
            try:
                if not again or self._registered(taken):
                    outcome(again)
                return
            except UNREACHABLE as exc:
                self.outage.wait(exc)
                again = True
                taken.job.retries_left = retries_left

    def _registered(self, taken: Taken) -> bool:
        registry = taken.queue.started_job_registry.key
        return self.connection.zscore(registry, taken.execution.composite_key) is not None

    def _settle(self, taken: Taken, ran: Any, seconds: float, again: bool) -> None:
        """Settle the job in the ledger (``jobs.settle``), then do RQ's part: its result, or its
        failure (and retry). ``ran``: what ``_perform`` returned or raised, after ``seconds``."""
        job = taken.job
        final = gives_up(job, ran)
        if taken.phase is None:  # the ledger started no attempt (``taken.error`` says why)
            settled = Settled(error=ran) if isinstance(ran, BaseException) else Settled(result=ran)
        else:
            settled = settle(self.runtime, taken.phase, ran, final, seconds)
        if settled.superseded is not None and (settled.error is None or not again):
            reason = settled.superseded
            if again and settled.error is None:
                # after a dropped connection, the hand-off may be this worker's own, made before it
                reason = Superseded(f"{reason}, or handed on before the connection dropped")
            self._drop(taken, reason)
        elif settled.error is None:
            self._finalize_success(job, taken.queue, taken.execution, settled.result)
        else:
            # after a dropped connection, a superseded failure record may be this worker's own,
            # made before it: RQ's part (the retry) still has to be
            error = settled.error
            self._finalize_failure(
                job, taken.queue, taken.execution, (type(error), error, error.__traceback__)
            )
            if self._registered(taken):  # RQ logs a failure it could not write, and goes on
                self.connection.ping()  # with the server away, the failure is recorded again once it is back

    def _drop(self, taken: Taken, reason: Superseded) -> None:
        """Let go of a job whose attempt was taken over (its host was thought lost): the job runs
        again elsewhere, or ran, so only this worker's own execution of it is cleaned up."""
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(taken.job, pipe, taken.execution)
            pipe.execute()
        log.warning("job %s: %s; this worker's outcome is dropped", taken.job.id, reason)


def first_line(error: BaseException | None) -> str:
    """The error's type and the first line of its message: what a log line has room for."""
    if error is None:
        return "unknown error"
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
