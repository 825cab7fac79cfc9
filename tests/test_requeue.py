"""A job goes back at the head of its queue once, whoever reaches for it and however often."""

from __future__ import annotations

import redis
from rq import Queue
from rq.executions import Execution
from rq.serializers import JSONSerializer

from levers.worker.requeue import put_back


def test_a_job_taken_but_never_registered_goes_back_once(connection: redis.Redis) -> None:
    queue = Queue("requeue.held", connection=connection, serializer=JSONSerializer)
    job = queue.enqueue("levers.worker.jobs.run_phase", "p", "a")
    # a worker moved it to the holding list, then lost its connection before registering it
    connection.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")

    assert put_back(connection, queue, job)  # the worker, once the server answers
    assert not put_back(connection, queue, job)  # the supervisor's look finds nothing left to take

    assert queue.get_job_ids() == [job.id]
    assert queue.intermediate_queue.get_job_ids() == []


def test_a_registered_job_goes_back_once_at_the_head(connection: redis.Redis) -> None:
    queue = Queue("requeue.registered", connection=connection, serializer=JSONSerializer)
    job, waiting = (queue.enqueue("levers.worker.jobs.run_phase", "p", d) for d in ("a", "b"))
    connection.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    with connection.pipeline() as pipe:  # registered as a worker's, as taking it does
        execution = Execution.create(job, 60, pipe, worker_name="first.host.1")
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        pipe.execute()
    written: list[str] = []

    assert put_back(connection, queue, job, [execution], lambda pipe: written.append("ledger"))
    # the same call again, as after a reply the connection lost: nothing is taken or written twice
    assert not put_back(connection, queue, job, [execution], lambda pipe: written.append("ledger"))

    assert queue.get_job_ids() == [job.id, waiting.id]
    assert queue.started_job_registry.get_job_ids(cleanup=False) == []
    assert connection.smembers(execution.worker_executions_key) == set()
    assert written == ["ledger"]
