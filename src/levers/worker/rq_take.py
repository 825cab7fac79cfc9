"""Taking a job off its queue as a worker's own, and giving it back when the worker will not run it.

Taking a job registers it with RQ (an execution in the started registry, the job off the holding
list its dequeue moved it to) and records the attempt's start in the ledger. Taking can fall
through: the supervisor may have put the job back on its queue while a slow take was on its way
(then the job is someone else's), or the connection may drop halfway (then the job goes back once
the server answers). A job taken and never run goes back at the head of its queue, exactly once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DequeueTimeout
from rq.executions import Execution
from rq.job import Job
from rq.utils import now

from levers import keys
from levers.pipeline.model import BatchSettings
from levers.server.outage import UNREACHABLE, reason
from levers.worker.guard import refusal, refuse
from levers.worker.jobs import SETTINGS_MAX_AGE_S, StartedPhase, start_phase, take_back_start
from levers.worker.lane_take import Lanes, Took, group, take_some
from levers.worker.requeue import put_back
from levers.worker.rq_reconnect import ReconnectingWorker
from levers.worker.runtime import WorkerRuntime, runtime_from_environment

log = logging.getLogger("levers.worker.process")


@dataclass
class Taken:
    """A job this worker has taken off its queue and registered as its own, not yet run."""

    job: Job
    queue: Queue
    execution: Execution
    phase: StartedPhase | None  # the ledger's record and the document, unless ``error``
    error: Exception | None = None  # why the ledger refused the job (its document is gone, say)
    # taken ahead from below the high lane, and not for its lane's minimum share: a high job that
    # comes in before it runs goes first (``since`` is when it was taken, in monotonic time)
    overtakable: bool = False
    since: float = field(default_factory=time.monotonic)


class TakingWorker(ReconnectingWorker):
    """Takes jobs for LeversWorker, and gives back those it will not run.

    ``runtime`` is what its jobs share (the live pipeline, the store, handler pools); a worker
    started without one (`rq worker -w levers.worker.rq_worker.LeversWorker`) makes its own, for
    LEVERS_FILE or ./pipeline.yaml, as it takes its first job.
    """

    def __init__(self, *args: Any, runtime: WorkerRuntime | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._runtime = runtime
        self._for_share = False  # the last job dequeued was taken for a lower lane's share
        self._high_pushed = float("-inf")  # when a job last entered a served high lane (monotonic)
        self._more: list[Took] = []  # jobs the last dequeue took besides the one it returned (a batch)

    def subscribe(self) -> None:
        """RQ's subscription to this worker's command channel, and to its phases' high-lane pushes."""
        self.outage.call(self._subscribe)

    def _subscribe(self) -> None:
        channels = {keys.lane_overtake(lanes.base): self._high_came for lanes in group(self.queues)}
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload, **channels})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=60, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def _high_came(self, message: object) -> None:
        self._high_pushed = time.monotonic()

    def overtaken(self, taken: Taken) -> bool:
        """Whether a job entered the high lane after ``taken``, an overtakable job, was taken."""
        return taken.overtakable and self._high_pushed >= taken.since

    @property
    def runtime(self) -> WorkerRuntime:
        if self._runtime is None:
            self._runtime = runtime_from_environment(self.connection)
        return self._runtime

    def dequeue(self, timeout: int | None) -> tuple[Job, Queue] | None:
        """The next job of the highest lane (but for a lower lane's share), moved to its lane's
        holding list in the same atomic step (levers.worker.lane_take); for a phase that batches,
        up to its batch size of jobs in that step, the others kept for ``take_rest``."""
        spec = self.runtime.watcher.current(SETTINGS_MAX_AGE_S).spec
        served = group(self.queues)
        counts = {lanes.base: self.batch_settings(lanes.queues[0]).size for lanes in served}
        while True:
            try:
                took = take_some(self.connection, served, spec.lanes.min_share, timeout, counts)
            except DequeueTimeout:
                if timeout is None:
                    return None
                raise
            self._for_share = took[0].for_share
            self._more.extend(took[1:])
            found = self._fetch(took[0])
            if found is not None:  # else the job's hash is gone; the supervisor clears its id
                return found

    def _fetch(self, took: Took) -> tuple[Job, Queue] | None:
        return self.queue_class._fetch_dequeued_job(
            self.connection, took.queue.key, took.job_id, job_class=self.job_class,
            serializer=self.serializer, death_penalty_class=self.death_penalty_class,
        )  # fmt: skip

    def batch_settings(self, queue: Queue) -> BatchSettings:
        """The ``batch:`` of the phase whose lane ``queue`` is (one at a time for another queue)."""
        spec = self.runtime.watcher.current(SETTINGS_MAX_AGE_S).spec
        base = keys.lane_of(queue.name)[0]
        phase = next((p for p in spec.phases if keys.queue_name(spec.name, p) == base), None)
        return spec.phases[phase].batch if phase is not None else BatchSettings()

    def batching(self, first: Taken) -> bool:
        """Whether ``first`` leads a batch: its phase batches, or jobs were taken with it."""
        return bool(self._more) or self.batch_settings(first.queue).size > 1

    def take_rest(self, first: Taken) -> list[Taken]:
        """The rest of the batch ``first`` leads, each registered as this worker's: the jobs taken
        with it, then more of its phase's as they come, until the batch is full or its
        ``wait_ms`` is over. Each take moves its jobs to their holding lists in one step, and each
        job is registered at once, so a worker killed meanwhile loses none."""
        settings = self.batch_settings(first.queue)
        more, self._more = self._more, []
        rest = [t for took in more if (t := self._take_took(took)) is not None]
        lanes = next(g for g in group(self.queues) if first.queue in g.queues)
        deadline = time.monotonic() + settings.wait_ms / 1000
        while len(rest) + 1 < settings.size and not self._stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for took in self._fill(lanes, settings.size - 1 - len(rest), left):
                if (taken := self._take_took(took)) is not None:
                    rest.append(taken)
        return rest

    def _fill(self, lanes: Lanes, count: int, left: float) -> list[Took]:
        spec = self.runtime.watcher.current(SETTINGS_MAX_AGE_S).spec
        try:
            return take_some(self.connection, [lanes], spec.lanes.min_share, left, {lanes.base: count})
        except DequeueTimeout:
            return []
        except UNREACHABLE as exc:
            self.outage.wait(exc)  # a job the lost reply moved goes back by the supervisor's look
            return []

    def _take_took(self, took: Took) -> Taken | None:
        found = self.outage.call(self._fetch, took)
        return self._take(*found) if found is not None else None

    def _take(self, job: Job, queue: Queue) -> Taken | None:
        """Register ``job`` as this worker's and record its start in the ledger. None when the job
        is not this worker's to run: it is not a levers job (it is failed at once, before anything
        it names is resolved), the supervisor put it back on its queue meanwhile (taking it took
        longer than its look at the holding list allows), or the connection dropped (the job goes
        back once the server answers, unless someone put it back first)."""
        taken_at = time.time()
        try:
            return self._take_once(job, queue)
        except UNREACHABLE as exc:
            self.outage.wait(exc)
            self.outage.call(self._give_back, job, queue, taken_at)
            return None

    def _take_once(self, job: Job, queue: Queue) -> Taken | None:
        reason = self._refusal(job, queue)
        if reason is not None:
            refuse(self.connection, job, queue, reason, self.name)
            return None
        execution = self.prepare_execution(job)
        if not self._register(job, queue):
            self.outage.call(self._let_go, job, execution)
            return None
        try:
            phase = start_phase(self.runtime, str(job.args[0]), str(job.args[1]))
        except UNREACHABLE:
            raise
        except Exception as exc:
            return Taken(job, queue, execution, None, exc)
        return Taken(job, queue, execution, phase)

    def _refusal(self, job: Job, queue: Queue) -> str | None:
        return refusal(job, queue.name, self.runtime.watcher.current(SETTINGS_MAX_AGE_S).spec)

    def _register(self, job: Job, queue: Queue) -> bool:
        """RQ's prepare_job_execution, which also takes the job off the holding list its dequeue
        moved it to; False when it was no longer there (someone put it back on its queue)."""
        with self.connection.pipeline() as pipe:
            ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            taken = pipe.execute()[-1]
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")
        return bool(taken)

    def _let_go(self, job: Job, execution: Execution) -> None:
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipe, execution)
            pipe.execute()
        log.warning("job %s was put back on %s before this worker registered it", job.id, job.origin)

    def _give_back(self, job: Job, queue: Queue, taken_at: float) -> None:
        """Put back a job whose taking (begun at ``taken_at``) the connection cut short, unless
        someone else did."""
        executions = [e for e in self.executions.values() if e.job_id == job.id]

        def queued(pipe: redis.client.Pipeline) -> None:
            # the start, if the ledger recorded it, is this worker's: it came after taken_at
            take_back_start(self.runtime, str(job.args[0]), str(job.args[1]), pipe, taken_at)

        also = queued if self._refusal(job, queue) is None else None  # the ledger knows only levers' jobs
        if put_back(self.connection, queue, job, executions, also):
            log.warning("job %s goes back to %s: the connection dropped as it was taken", job.id, queue.name)
        for execution in executions:
            self.executions.pop(execution.id, None)

    def _release(self, taken: Taken, why: str) -> None:
        """Put a taken job back at the head of its queue, its attempt taken back: one that never
        ran, or that a stop cut short. Tried once: a stopping worker does not wait for Redis, and
        what stays registered to it, the supervisor puts back once it has ended."""
        phase, job, queue = taken.phase, taken.job, taken.queue
        taken_at = taken.execution.created_at.timestamp()

        def released(pipe: redis.client.Pipeline) -> None:
            if phase is not None:
                take_back_start(self.runtime, phase.phase, phase.record.id, pipe, taken_at, phase.attempt)

        try:
            if put_back(self.connection, queue, job, [taken.execution], released):
                log.info("job %s goes back to %s: %s", job.id, queue.name, why)
        except UNREACHABLE as exc:
            log.warning("job %s stays this worker's, for the supervisor to put back: %s", job.id, reason(exc))
        self.executions.pop(taken.execution.id, None)
