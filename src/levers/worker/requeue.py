"""Putting a job back at the head of its queue exactly once, whoever does it.

A job can be held in two places: a queue's holding list (a worker took it off the queue and has
not registered it yet) and the started registry (a worker registered it as one of its executions).
A worker giving back a job the connection cut short as it was taken, the supervisor recovering a
dead worker's jobs, and the supervisor's look for jobs nobody registered may all reach for the
same job. Each takes it out of wherever it still is and enqueues it in one transaction, watching
the job's hash, which every take, settling and requeue writes: the first one through wins, and
the others, or the same one again after a dropped connection, find nothing left to take.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import redis
from redis.client import Pipeline
from rq import Queue
from rq.executions import Execution
from rq.job import Job


def take_back(
    connection: redis.Redis, queue: Queue, job: Job, executions: Iterable[Execution],
    then: Callable[[Pipeline], object],
) -> bool:  # fmt: skip
    """Take ``job`` off ``queue``'s holding list and out of those of ``executions`` still registered,
    and run ``then`` on the same transaction; False, writing nothing, when it was in neither."""
    registry = queue.started_job_registry.key
    executions = list(executions)
    while True:
        with connection.pipeline() as pipe:
            try:
                pipe.watch(job.key)
                held = pipe.lpos(queue.intermediate_queue_key, job.id) is not None
                registered = [e for e in executions if pipe.zscore(registry, e.composite_key) is not None]
                if not held and not registered:
                    return False
                pipe.multi()
                pipe.lrem(queue.intermediate_queue_key, 1, job.id)
                for execution in registered:
                    execution.delete(job=job, pipeline=pipe)
                then(pipe)
                pipe.execute()
                return True
            except redis.WatchError:
                continue


def put_back(
    connection: redis.Redis, queue: Queue, job: Job, executions: Iterable[Execution] = (),
    also: Callable[[Pipeline], object] | None = None,
) -> bool:  # fmt: skip
    """``take_back`` the job and enqueue it at the head of ``queue``; ``also`` adds writes."""

    def enqueue(pipe: Pipeline) -> None:
        if also is not None:
            also(pipe)
        queue.enqueue_job(job, pipeline=pipe, at_front=True)

    return take_back(connection, queue, job, executions, enqueue)
