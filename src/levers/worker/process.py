"""One worker process: a real RQ worker on one phase's queue, and the recovery of its jobs if it dies.

Workers do not fork per job (RQ's SimpleWorker model): the handler modules are imported once,
before the worker is forked from the supervisor, and every job runs in the worker itself.
The worker serves its phase's priority lanes, and moves each job it takes to its lane's holding
list in the same atomic step (levers.worker.lane_take).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.client import Pipeline
from rq import Queue
from rq.defaults import DEFAULT_RESULT_TTL
from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from levers import keys
from levers.documents.lanes import LaneQueue
from levers.documents.ledger import Ledger
from levers.documents.routing import JOB_FUNCTION
from levers.pipeline.watching import PipelineWatcher
from levers.safe import log_to
from levers.server.connection import Target, client
from levers.server.outage import no_resend
from levers.worker.progress import WorkerProgress
from levers.worker.requeue import put_back, take_back
from levers.worker.rq_worker import LeversWorker
from levers.worker.runtime import WorkerRuntime

log = logging.getLogger("levers.worker.process")

# How often a worker checks that its supervisor is still there.
ORPHAN_CHECK_S = 1.0
# How long a worker whose supervisor is gone waits for an unreachable Redis before it ends.
ORPHAN_OUTAGE_S = 30.0
# A job off its queue but not registered as started this long after it was seen was taken by a
# worker that died, or whose connection dropped: a live worker registers its job within
# milliseconds, unless its host's CPU is so contended that it waits seconds for a turn (a 1 s
# grace put back live workers' jobs at a load of 18 on 2 cores). One that took longer still finds
# the job put back and leaves it.
REGISTER_GRACE_S = 3.0
# How often the supervisor looks at its queues' holding lists for such jobs, besides after a death.
STRANDED_LOOK_S = 5.0
LOG_FORMAT = "%(asctime)s %(levelname)s [{phase} pid=%(process)d queue={queue}] %(message)s"


def worker_name(phase: str, pid: int) -> str:
    return f"{phase}.{socket.gethostname()}.{pid}"


@dataclass(frozen=True)
class WorkerLogs:
    verbose: bool = False  # RQ's own lines, one or more per job, too
    json: bool = False  # one JSON object per line


def run_worker(
    pipeline_path: Path, phase: str, target_url: str, embedded: bool,
    progress: WorkerProgress | None = None, supervisor_pid: int | None = None,
    logs: WorkerLogs = WorkerLogs(), copy: Path | None = None,
) -> None:  # fmt: skip
    """Body of a worker process: serve ``phase``'s queue until told to stop, or until the
    supervisor (default: the parent process) is gone; ``progress`` is shared with it. ``copy``
    holds the version of the pipeline the supervisor runs (default: the file itself)."""
    supervisor_pid = supervisor_pid or os.getppid()
    # the supervisor handles the terminal's signals; a worker hears only what the supervisor sends
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    watcher = PipelineWatcher.open(pipeline_path, copy)
    spec = watcher.current().spec
    # not connected yet: with the server away, the worker waits for it as it registers
    connection = no_resend(client(Target(url=target_url, embedded=embedded)))
    queue_name = keys.queue_name(spec.name, phase)
    log_format = LOG_FORMAT.format(phase=phase, queue=queue_name)
    log_to(logging.StreamHandler(), log_format, {"phase": phase, "queue": queue_name} if logs.json else None,
           logs.verbose)  # fmt: skip
    worker = LeversWorker(
        [Queue(queue_name, connection=connection, serializer=JSONSerializer)],
        connection=connection,
        name=worker_name(phase, os.getpid()),
        serializer=JSONSerializer,
        worker_ttl=keys.WORKER_TTL_S,
        progress=progress,
        runtime=WorkerRuntime(watcher, connection, target_url),
    )
    _stop_when_orphaned(worker, supervisor_pid)
    worker.work(
        with_scheduler=True, logging_level="INFO" if logs.verbose else "WARNING", log_format=log_format
    )


def _stop_when_orphaned(worker: LeversWorker, supervisor_pid: int) -> None:
    """Ask this worker to stop (after its current job) if its supervisor dies, even by SIGKILL.

    Workers lead their own process groups, so nothing else would end them: a restarted supervisor
    would then run its full complement beside the orphans. A stop already under way (the
    supervisor's SIGTERM came before its SIGKILL, as platforms send them) is left to finish: a
    second signal would be a cold stop, cutting the running job short. An orphan that cannot
    reach Redis for ORPHAN_OUTAGE_S ends, with its process group: no supervisor will stop it, and
    what it holds stays registered to it for whoever recovers it.
    """

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(ORPHAN_CHECK_S)
        gone = f"the supervisor (pid {supervisor_pid}) is gone"
        if worker.stopping:
            log.warning("%s: this worker was already stopping after its current job", gone)
        else:
            log.warning("%s: stopping after the current job", gone)
            os.kill(os.getpid(), signal.SIGTERM)
        while not worker.outage.lasted(ORPHAN_OUTAGE_S):
            time.sleep(ORPHAN_CHECK_S)
        log.error("the supervisor is gone and Redis has not answered for %.0f s: ending", ORPHAN_OUTAGE_S)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, name="levers-orphan-watch", daemon=True).start()


def recover_jobs(
    connection: redis.Redis, pipeline: str, name: str, max_recoveries: int, struck: Callable[[str], bool],
    lost: str | None = None,
) -> list[str]:  # fmt: skip
    """Put back at the head of their queues the jobs a dead worker held; returns their ids.

    ``struck(job_id)`` tells the job whose handler was running when the worker died: it carries a
    worker-death mark, and one whose workers died under it more than ``max_recoveries`` times is
    failed instead, so a document that kills its worker (out of memory, say) cannot loop forever.
    The others (taken ahead and not started, or cut short by a stop) go back as if never taken:
    no mark, their attempt taken back. A job whose handler ended and whose document was handed on
    (the worker died while recording the rest) is recorded as finished, never run again. ``lost``
    is why the worker's host is thought gone: each document records it, and goes back only if it
    is still running that phase.
    Each job is taken from the worker and settled in one transaction, so a recovery the
    connection cut short can run again: what got through is no longer the worker's.
    """
    worker = LeversWorker.find_by_key(
        LeversWorker.redis_worker_namespace_prefix + name, connection=connection, serializer=JSONSerializer
    )
    if worker is None:
        return []
    recovered = []
    for execution in worker.get_current_executions(refresh=True):
        try:
            job = Job.fetch(execution.job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue  # expired or deleted: nothing left to run
        queue = LaneQueue(job.origin, connection=connection, serializer=JSONSerializer)  # its own lane
        levers_job = job.func_name == JOB_FUNCTION
        ledger = Ledger(connection, pipeline)
        if levers_job and ledger.phase_finished(str(job.args[1]), str(job.args[0])):
            if take_back(connection, queue, job, [execution], _finishing(job, queue)):
                log.warning(
                    "job %s of dead worker %s had handed its document on: not run again", job.id, name
                )
            continue
        if lost is not None and levers_job and not ledger.host_lost(str(job.args[1]), str(job.args[0]), lost):
            continue  # the document is not running this phase any more: nothing to run again
        if struck(job.id):
            if _requeue_struck(connection, pipeline, job, queue, execution, max_recoveries):
                recovered.append(job.id)
        elif _requeue_unmarked(connection, pipeline if levers_job else None, job, queue, execution):
            log.warning("requeued job %s unmarked: worker %s was not running it or was stopped", job.id, name)
            recovered.append(job.id)
    worker.register_death()
    return recovered


def _finishing(job: Job, queue: Queue) -> Callable[[Pipeline], None]:
    """The writes that record as finished a job whose document was handed on, for ``take_back``."""

    def finish(pipe: Pipeline) -> None:
        ttl = job.result_ttl if job.result_ttl is not None else DEFAULT_RESULT_TTL
        if ttl == 0:  # as RQ does: a job whose result is not kept goes once it finished
            job.delete(pipeline=pipe, remove_from_queue=False)
            return
        job.set_status(JobStatus.FINISHED, pipeline=pipe)
        FinishedJobRegistry(queue=queue).add(job, ttl, pipeline=pipe)

    return finish


def _requeue_unmarked(
    connection: redis.Redis, pipeline: str | None, job: Job, queue: Queue, execution: Execution
) -> bool:
    """Requeue a job as if never taken, its attempt taken back in ``pipeline``'s ledger (None: not
    a levers job). False when someone else had put it back."""
    taken_at = execution.created_at.timestamp()

    def released(pipe: Pipeline) -> None:
        if pipeline is not None:
            Ledger(connection, pipeline).release_on(pipe, str(job.args[1]), str(job.args[0]), taken_at)

    return put_back(connection, queue, job, [execution], released)


def _requeue_struck(
    connection: redis.Redis, pipeline: str, job: Job, queue: Queue, execution: Execution, max_deaths: int
) -> bool:
    """Requeue, with a worker-death mark, the job whose handler was running when its worker died;
    fail it past ``max_deaths`` marks. False when someone else had put it back."""
    deaths = int(job.meta.get("worker_deaths", 0)) + 1
    job.meta["worker_deaths"] = deaths  # saved with the job as it is enqueued again
    if deaths > max_deaths:
        if not take_back(connection, queue, job, [execution], _failing(connection, pipeline, job, queue)):
            return False
        log.error("failed job %s: its worker died %d times while running it", job.id, deaths)
        return True
    if not put_back(connection, queue, job, [execution]):
        return False
    log.warning("requeued job %s: its worker died while running it", job.id)
    return True


class StrandedJobs:
    """Jobs taken off a queue that no worker registered, put back after a second look, into the
    lane they were taken from.

    A worker moves a job to the queue's holding list, then registers it as started, a few
    milliseconds later. One killed in between, or whose connection dropped with the move's reply,
    leaves the job in neither place, where RQ would fail it after a minute or more. ``note``
    records a queue's unregistered jobs, after a worker's death and, every ``STRANDED_LOOK_S``,
    for each queue ``queues()`` names; ``requeue_due``, called on every supervisor tick, puts back
    at the head of the queue those still unregistered ``REGISTER_GRACE_S`` after they were noted
    (live workers register theirs within milliseconds). The supervisor never waits for the second
    look.
    """

    def __init__(
        self, connection: redis.Redis, queues: Callable[[], Iterable[str]] = tuple,
        clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
    ) -> None:  # fmt: skip
        self.connection = connection
        self._queues = queues
        self._clock = clock
        self._sleep = sleep  # waits on ``clock``: a test passes both
        self._noted: dict[str, dict[str, float]] = {}  # queue -> job id -> when first noted
        self._next_look = float("-inf")

    def note(self, queue_name: str) -> None:
        suspects = _unregistered(self._queue(queue_name))
        if suspects:  # a queue is kept only while it has jobs to look at again
            noted = self._noted.setdefault(queue_name, {})
            now = self._clock()
            for job_id in suspects:
                noted.setdefault(job_id, now)

    def requeue_due(self, wait: bool = False) -> list[str]:
        """Put back the noted jobs still unregistered after the grace period; their ids. ``wait``
        sleeps until every noted job is due (the supervisor's last tick)."""
        if self._clock() >= self._next_look:
            self._next_look = self._clock() + STRANDED_LOOK_S
            for name in self._queues():
                self.note(name)
        if wait and self._noted:
            last = max(at for noted in self._noted.values() for at in noted.values())
            self._sleep(max(0.0, last + REGISTER_GRACE_S - self._clock()))
        now = self._clock()
        requeued = []
        for queue_name, noted in list(self._noted.items()):
            due = {job_id for job_id, at in noted.items() if now - at >= REGISTER_GRACE_S}
            if due:
                queue = self._queue(queue_name)
                requeued += [j for j in sorted(due & _unregistered(queue)) if self._requeue(queue, j)]
            for job_id in due:
                del noted[job_id]
            if not noted:
                del self._noted[queue_name]
        return requeued

    def _queue(self, name: str) -> Queue:
        return LaneQueue(name, connection=self.connection, serializer=JSONSerializer)

    def _requeue(self, queue: Queue, job_id: str) -> bool:
        job = queue.fetch_job(job_id)
        if job is None:  # nothing left to run
            self.connection.lrem(queue.intermediate_queue_key, 1, job_id)
            return False
        if not put_back(self.connection, queue, job):
            return False  # someone else moved it meanwhile
        log.warning(
            "requeued job %s: off %s, not registered within %.0f s (its worker died or lost the server)",
            job_id,
            queue.name,
            REGISTER_GRACE_S,
        )
        return True


def _unregistered(queue: Queue) -> set[str]:
    held = set(queue.intermediate_queue.get_job_ids())
    return held - set(queue.started_job_registry.get_job_ids(cleanup=False)) if held else set()


def _failing(connection: redis.Redis, pipeline: str, job: Job, queue: Queue) -> Callable[[Pipeline], None]:
    """The writes that fail a job its workers died under too often, for ``take_back``."""
    reason = f"its worker died {job.meta['worker_deaths']} times while running it (out of memory?)"

    def fail(pipe: Pipeline) -> None:
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue=queue).add(job, ttl=job.failure_ttl, exc_string=reason, pipeline=pipe)
        phase, doc_id = job.args[0], job.args[1]
        Ledger(connection, pipeline).attempt_failed(doc_id, phase, reason, final=True, pipe=pipe)

    return fail
