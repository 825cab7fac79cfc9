"""What a levers worker runs: levers' own phase jobs, and nothing else that reaches its queue.

RQ runs whatever importable function a job names, with whatever arguments it carries, and imports
the callbacks it names: anything that can write to Redis could run code on the workers. A levers
worker checks every job it takes before anything the job names is resolved; a job that is not
``levers.worker.jobs.run_phase(phase, doc_id)`` for the queue's own phase, as JSON, without callbacks or
webhooks, is failed with the reason and one log line. ``GuardedJob``, the job class levers'
workers use, resolves no other function or callback, should any path of RQ's ask it to.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import redis
from rq import Queue
from rq.exceptions import DeserializationError, NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry
from rq.results import Result
from rq.serializers import JSONSerializer

from levers import keys
from levers.documents.routing import FAILURE_TTL_S, ID_HEX_DIGITS, JOB_FUNCTION
from levers.pipeline.model import Pipeline
from levers.worker.jobs import run_phase

log = logging.getLogger("levers.worker.process")

DOCUMENT_ID = re.compile(rf"[0-9a-f]{{{ID_HEX_DIGITS}}}")
# Longest part of a job's own text (a function name, arguments) quoted in a refusal.
QUOTED_CHARS = 80


class ForeignJob(Exception):
    """A job asked for a function or callback that is not levers' own."""


class GuardedJob(Job):
    """An RQ job that resolves no function but ``levers.worker.jobs.run_phase``, and no callback.

    A job hash it cannot read is not an error here: the job is marked ``unreadable`` and the
    worker refuses it, rather than dying on it (and on it again after each restart).
    """

    unreadable: str | None = None

    def restore(self, raw_data: Any) -> None:
        try:
            super().restore(raw_data)
        except NoSuchJobError:
            raise
        except Exception as exc:
            self.unreadable = f"its fields cannot be read ({type(exc).__name__})"

    @property
    def func(self) -> Any:
        if self.func_name != JOB_FUNCTION or self.instance is not None:
            raise ForeignJob(f"{_quoted(self.func_name)} is not levers' job function")
        return run_phase

    @property
    def success_callback(self) -> None:
        return _no_callback(self._success_callback_name)

    @property
    def failure_callback(self) -> None:
        return _no_callback(self._failure_callback_name)

    @property
    def stopped_callback(self) -> None:
        return _no_callback(self._stopped_callback_name)

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """Sends nothing: levers' jobs have no webhooks, and a job that names some is refused; RQ's
        registry cleanups would otherwise send a hand-written job's requests from the worker."""


def _no_callback(name: str | None) -> None:
    if name:
        raise ForeignJob(f"levers' jobs have no callbacks; this one names {_quoted(name)}")


def refusal(job: Job, queue_name: str, spec: Pipeline) -> str | None:
    """Why a worker must not run ``job``, taken from ``queue_name``; None for one of levers' own.

    Reads the job's JSON payload and fields only: nothing the job names is imported.
    """
    unreadable = getattr(job, "unreadable", None)
    if unreadable:
        return str(unreadable)
    if job.serializer is not JSONSerializer:  # a worker never unpickles what it finds in Redis
        return "levers' workers read jobs as JSON only"
    try:
        func_name, instance, args, kwargs = job.func_name, job.instance, job.args, job.kwargs
    except DeserializationError:
        return "its payload is not JSON (a pickled job?); levers' jobs are JSON"
    if func_name != JOB_FUNCTION or instance is not None:
        return f"it names {_quoted(func_name)}; levers' workers run only {JOB_FUNCTION}"
    two_strings = isinstance(args, list | tuple) and len(args) == 2 and all(isinstance(a, str) for a in args)
    if kwargs or not two_strings:
        return f"its arguments {_quoted(args)} {_quoted(kwargs)} are not (phase, document id)"
    phase, doc_id = args
    if phase not in spec.phases or queue_name not in keys.lane_queues(spec.name, phase):
        return f"its phase {_quoted(phase)} is not the phase of {queue_name}"
    if not DOCUMENT_ID.fullmatch(doc_id):
        return f"{_quoted(doc_id)} is not a document id"
    callbacks = [job._success_callback_name, job._failure_callback_name, job._stopped_callback_name]
    if any(callbacks):
        return f"it names callbacks ({', '.join(_quoted(c) for c in callbacks if c)}); levers' jobs have none"
    if job.webhooks:
        return "it names webhooks; levers' jobs have none"
    return None


def refuse(connection: redis.Redis, job: Job, queue: Queue, reason: str, worker_name: str) -> None:
    """Fail ``job`` for good with ``reason`` (RQ's failed registry and result, as `rq info` and
    rq-dashboard show them), running nothing it names: no retry, callback or webhook. It leaves the
    queue's holding list, where taking it put it."""
    exc_string = f"refused by levers: {reason}"
    with connection.pipeline() as pipe:
        pipe.lrem(queue.intermediate_queue_key, 1, job.id)
        job.set_status(JobStatus.FAILED, pipeline=pipe)
        FailedJobRegistry(queue=queue).add(job, ttl=FAILURE_TTL_S, exc_string=exc_string, pipeline=pipe)
        Result.create_failure(job, FAILURE_TTL_S, exc_string, worker_name=worker_name, pipeline=pipe)
        pipe.execute()
    log.error("refused job %s from %s: %s", job.id, queue.name, reason)


def _quoted(value: object) -> str:
    text = repr(value)  # repr escapes control characters and bidi overrides
    return text if len(text) <= QUOTED_CHARS else text[: QUOTED_CHARS - 1] + "…"
