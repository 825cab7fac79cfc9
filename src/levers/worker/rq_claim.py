"""Claiming a job as a worker's own, and giving it back when the worker will not run it.

A claim registers the job with RQ (an execution in the started registry, the job off the holding
list its dequeue moved it to) and records the attempt's start in the ledger. A claim can fall
through: the supervisor may have put the job back on its queue while a slow claim was on its way
(then the job is someone else's), or the connection may drop halfway (then the job goes back once
the server answers). A claim that never ran goes back at the head of its queue, exactly once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
from rq import Queue
from rq.executions import Execution
from rq.job import Job
from rq.utils import now

from levers.server.outage import UNREACHABLE, reason
from levers.worker.guard import refusal, refuse
from levers.worker.jobs import SETTINGS_MAX_AGE_S, ClaimedPhase, claim_phase, current_runtime, release_claim
from levers.worker.requeue import put_back
from levers.worker.rq_reconnect import ReconnectingWorker

log = logging.getLogger("levers.worker.process")


@dataclass
class Claim:
    """A job this worker has taken off its queue and registered as its own, not yet run."""

    job: Job
    queue: Queue
    execution: Execution
    phase: ClaimedPhase | None  # the ledger's record and the document, unless ``error``
    error: Exception | None = None  # why the ledger refused the job (its document is gone, say)


class ClaimingWorker(ReconnectingWorker):
    """Claims jobs for LeversWorker, and gives back those it will not run."""

    def _claim(self, job: Job, queue: Queue) -> Claim | None:
        """Register ``job`` as this worker's and record its start in the ledger. None when the job
        is not this worker's to run: it is not a levers job (it is failed at once, before anything
        it names is resolved), the supervisor put it back on its queue meanwhile (the claim took
        longer than its look at the holding list allows), or the connection dropped (the job goes
        back once the server answers, unless someone put it back first)."""
        claimed_at = time.time()
        try:
            return self._claim_once(job, queue)
        except UNREACHABLE as exc:
            self.outage.wait(exc)
            self.outage.call(self._give_back, job, queue, claimed_at)
            return None

    def _claim_once(self, job: Job, queue: Queue) -> Claim | None:
        reason = self._refusal(job, queue)
        if reason is not None:
            refuse(self.connection, job, queue, reason, self.name)
            return None
        execution = self.prepare_execution(job)
        if not self._register(job, queue):
            self.outage.call(self._let_go, job, execution)
            return None
        try:
            phase = claim_phase(current_runtime(), str(job.args[0]), str(job.args[1]))
        except UNREACHABLE:
            raise
        except Exception as exc:
            return Claim(job, queue, execution, None, exc)
        return Claim(job, queue, execution, phase)

    def _refusal(self, job: Job, queue: Queue) -> str | None:
        return refusal(
            job, queue.name, current_runtime(self.connection).watcher.current(SETTINGS_MAX_AGE_S).spec
        )

    def _register(self, job: Job, queue: Queue) -> bool:
        """RQ's prepare_job_execution, which also takes the job off the holding list its dequeue
        moved it to; False when it was no longer there (someone put it back on its queue)."""
        holding = len(self.queues) == 1  # from several queues, RQ pops a job without holding it
        with self.connection.pipeline() as pipe:
            ttl = self.get_heartbeat_ttl(job)
            self.heartbeat(ttl, pipeline=pipe)
            job.heartbeat(now(), ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            if holding:
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
            taken = pipe.execute()[-1]
        self.procline(f"Processing {job.func_name} from {job.origin} since {time.time()}")
        return not holding or bool(taken)

    def _let_go(self, job: Job, execution: Execution) -> None:
        with self.connection.pipeline() as pipe:
            self.cleanup_execution(job, pipe, execution)
            pipe.execute()
        log.warning("job %s was put back on %s before this worker registered it", job.id, job.origin)

    def _give_back(self, job: Job, queue: Queue, claimed_at: float) -> None:
        """Put back a job whose claim (begun at ``claimed_at``) the connection cut short, unless
        someone else did."""
        executions = [e for e in self.executions.values() if e.job_id == job.id]

        def queued(pipe: redis.client.Pipeline) -> None:
            # the start, if the ledger recorded it, is this claim's: it came after claimed_at
            release_claim(current_runtime(), str(job.args[0]), str(job.args[1]), pipe, claimed_at)

        also = queued if self._refusal(job, queue) is None else None  # the ledger knows only levers' jobs
        if put_back(self.connection, queue, job, executions, also):
            log.warning("job %s goes back to %s: the connection dropped during its claim", job.id, queue.name)
        for execution in executions:
            self.executions.pop(execution.id, None)

    def _release(self, claim: Claim, why: str) -> None:
        """Put a claimed job back at the head of its queue, its attempt taken back: one that never
        ran, or that a stop cut short. Tried once: a stopping worker does not wait for Redis, and
        what stays registered to it, the supervisor puts back once it has ended."""
        phase, job, queue = claim.phase, claim.job, claim.queue
        claimed_at = claim.execution.created_at.timestamp()

        def released(pipe: redis.client.Pipeline) -> None:
            if phase is not None:
                release_claim(
                    current_runtime(), phase.phase, phase.record.id, pipe, claimed_at, phase.attempt
                )

        try:
            if put_back(self.connection, queue, job, [claim.execution], released):
                log.info("job %s goes back to %s: %s", job.id, queue.name, why)
        except UNREACHABLE as exc:
            log.warning("job %s stays this worker's, for the supervisor to put back: %s", job.id, reason(exc))
        self.executions.pop(claim.execution.id, None)
