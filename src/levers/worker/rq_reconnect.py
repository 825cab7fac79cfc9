"""RQ's in-process worker and its scheduler, riding out Redis outages instead of dying of them.

RQ's work loop survives a dropped connection only while it waits for a job: any other call that
cannot reach the server (a heartbeat, a state change, its maintenance) ends the worker, and the
scheduler process (it enqueues the retries due after a delay) dies of the first one. Here each of
those calls waits for the server, one line when it is lost and one when it is back, then goes
again: each does the same however many times it gets through. Calls that do not (taking a job,
recording its outcome) are LeversWorker's, which looks at what got through before going again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from typing import Any

from redis.client import PubSub, PubSubWorkerThread
from rq import SimpleWorker
from rq.defaults import DEFAULT_LOGGING_DATE_FORMAT, DEFAULT_LOGGING_FORMAT
from rq.exceptions import DequeueTimeout
from rq.job import Job
from rq.queue import Queue
from rq.scheduler import RQScheduler
from rq.utils import utcformat
from rq.worker import WorkerStatus

from levers.server.outage import UNREACHABLE, Outage

log = logging.getLogger("levers.worker.process")


class ReconnectingWorker(SimpleWorker):
    """RQ's SimpleWorker whose own calls to Redis wait out an outage (see the module's text)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage = Outage(self.connection, log)

    def register_birth(self) -> None:
        self.outage.call(self._register_birth)

    def _register_birth(self) -> None:
        # RQ refuses a name registered and alive: after a lost reply, that is this worker's own
        if (
            self.birth_date is not None
            and self.connection.hget(self.key, "birth") == utcformat(self.birth_date).encode()
        ):
            return
        super().register_birth()

    def subscribe(self) -> None:
        self.outage.call(super().subscribe)

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is not None:
            super().set_state(state, pipeline)
        else:
            self.outage.call(super().set_state, state)

    def check_for_suspension(self, burst: bool) -> None:
        self.outage.call(super().check_for_suspension, burst)

    def run_maintenance_tasks(self) -> None:
        self.outage.call(super().run_maintenance_tasks)

    def set_shutdown_requested_date(self) -> None:
        # a note for dashboards, written from the stop signal's handler: never worth waiting for
        with contextlib.suppress(*UNREACHABLE):
            super().set_shutdown_requested_date()

    def register_death(self) -> None:
        # the supervisor records it too, once it has put back what this worker held
        with contextlib.suppress(*UNREACHABLE):
            super().register_death()

    def unsubscribe(self) -> None:
        with contextlib.suppress(*UNREACHABLE):
            super().unsubscribe()

    def _pubsub_exception_handler(
        self, exc: Exception, pubsub: PubSub, pubsub_thread: PubSubWorkerThread
    ) -> None:
        if not isinstance(exc, UNREACHABLE):
            super()._pubsub_exception_handler(exc, pubsub, pubsub_thread)
            return
        self.outage.wait(exc)  # redis-py subscribes again when it reconnects

    def wait_for_job(self, timeout: int | None) -> tuple[Job, Queue] | None:
        """RQ's wait for the next job (heartbeats, maintenance, a blocking pop), through outages."""
        self.set_state(WorkerStatus.IDLE)
        self.procline("Listening on " + ",".join(self.queue_names()))
        while True:
            self.heartbeat()
            if self.should_run_maintenance_tasks:
                self.run_maintenance_tasks()
            try:
                found = self.dequeue(timeout)
            except DequeueTimeout:
                continue
            except UNREACHABLE as exc:
                # a job the lost reply had moved to the holding list goes back by the supervisor's look
                self.outage.wait(exc)
                continue
            if found is not None:
                job, queue = found
                job.redis_server_version = self.outage.call(self.get_redis_server_version)
                if self.log_job_description:
                    self.log.info("Worker %s: %s: %s (%s)", self.name, queue.name, job.description, job.id)
                else:
                    self.log.info("Worker %s: %s: %s", self.name, queue.name, job.id)
            return found

    def dequeue(self, timeout: int | None) -> tuple[Job, Queue] | None:
        """The next job and its queue: RQ's dequeue (None: look once; else block up to
        ``timeout`` seconds, DequeueTimeout if nothing came)."""
        return self.queue_class.dequeue_any(
            self._ordered_queues, timeout, connection=self.connection, job_class=self.job_class,
            serializer=self.serializer, death_penalty_class=self.death_penalty_class,
        )  # fmt: skip

    def _start_scheduler(
        self, burst: bool = False, logging_level: str | None = "INFO",
        date_format: str = DEFAULT_LOGGING_DATE_FORMAT, log_format: str = DEFAULT_LOGGING_FORMAT,
    ) -> None:  # fmt: skip
        if burst:  # RQ's: enqueue what is due once, no process
            super()._start_scheduler(burst, logging_level, date_format, log_format)
            return
        level = logging_level if logging_level is not None else self.log.level
        self.scheduler = ReconnectingScheduler(
            self.queues, connection=self.connection, logging_level=level, date_format=date_format,
            log_format=log_format, serializer=self.serializer,
        )  # fmt: skip
        self.outage.call(self.scheduler.acquire_locks)
        if self.scheduler.acquired_locks:
            self.scheduler.start()


class ReconnectingScheduler(RQScheduler):
    """RQ's scheduler process, its loop going on through outages; a stop request ends it even then,
    and so does the end of the worker that started it (RQ's would run on, orphaned)."""

    def work(self) -> None:
        self._install_signal_handlers()
        outage = Outage(self.connection, logging.getLogger("levers.scheduler"))
        worker = os.getppid()
        born = False
        while not self._stop_requested and os.getppid() == worker:
            try:
                if not born:
                    self.register_birth()
                    born = True
                if self.should_reacquire_locks:
                    self.acquire_locks()
                self.heartbeat()
                self.enqueue_scheduled_jobs()
            except UNREACHABLE as exc:
                time.sleep(outage.failed(exc))
                continue
            outage.over()
            time.sleep(self.interval)
        with contextlib.suppress(*UNREACHABLE):
            self.stop()
