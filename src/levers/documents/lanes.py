"""Priority lanes: every phase has three RQ queues, high, normal and low, and a document keeps its
lane through every phase.

The normal lane is the phase's plain queue (``<name>.<phase>``), the others add their lane
(``<name>.<phase>:high``), so `rq info` and rq-dashboard list each lane as a queue of its own.
Every job that enters a lane, whoever enqueues it, goes through ``LaneQueue.push_job_id``, which
also sets the phase's wake list (levers.keys.lane_wake): an idle worker of the phase blocks on
that one list, whichever lane the job entered. Workers take from the lanes in
levers.worker.lane_take.
"""

from __future__ import annotations

import redis
from redis.client import Pipeline
from rq import Queue
from rq.serializers import JSONSerializer

from levers import keys
from levers.errors import UsageError

PRIORITIES = keys.LANES


def checked_priority(priority: str) -> str:
    """``priority`` as given, when it names a lane; else a UsageError naming the choices."""
    if priority not in PRIORITIES:
        raise UsageError(f"unknown priority {priority!r}", fix=f"use one of {', '.join(PRIORITIES)}")
    return priority


class LaneQueue(Queue):
    """An RQ queue of one lane of a phase: a job pushed onto it also wakes the phase's workers."""

    def push_job_id(self, job_id: str, pipeline: Pipeline | None = None, at_front: bool = False) -> None:
        super().push_job_id(job_id, pipeline=pipeline, at_front=at_front)
        if pipeline is not None:
            self._wake(pipeline)
            return
        with self.connection.pipeline(transaction=False) as pipe:
            self._wake(pipe)
            pipe.execute()

    def _wake(self, pipe: Pipeline) -> None:
        base, lane = keys.lane_of(self.name)
        wake = keys.lane_wake(base)
        # one item is enough to wake every worker blocked on the list: each puts it back as it wakes
        pipe.lpush(wake, 1)
        pipe.ltrim(wake, 0, 0)
        if lane == PRIORITIES[0]:
            # a busy worker holding a lower job it took ahead gives it back for this one
            pipe.publish(keys.lane_overtake(base), 1)


def lane_queue(connection: redis.Redis, pipeline: str, phase: str, lane: str = keys.NORMAL) -> LaneQueue:
    return LaneQueue(keys.queue_name(pipeline, phase, lane), connection=connection, serializer=JSONSerializer)


def phase_lanes(connection: redis.Redis, pipeline: str, phase: str) -> list[LaneQueue]:
    """A phase's lanes' queues, highest first."""
    return [lane_queue(connection, pipeline, phase, lane) for lane in PRIORITIES]
