"""Where a document goes: the entry phase for its type, and the RQ job that carries it to a phase.

Job payloads are JSON (RQ's JSONSerializer): the job names ``levers.worker.jobs.run_phase`` and carries
the phase and document id only; documents and outputs live in the artifact store. Workers run no
other job (levers.worker.guard).
"""

from __future__ import annotations

import redis
from rq import Queue, Retry
from rq.job import Job

from levers import keys
from levers.documents.lanes import LaneQueue, lane_queue
from levers.errors import DocumentError
from levers.pipeline.model import MAX_RETRY_DELAY_S, Phase, Pipeline

JOB_FUNCTION = "levers.worker.jobs.run_phase"
# Hex digits of the content hash kept as a document id (the job's second argument): 80 bits, short
# enough to type.
ID_HEX_DIGITS = 20
# A finished job's hash and result go as soon as it has handed its document on: the ledger records
# the outcome, and a result kept per job would hold kilobytes per document in Redis.
RESULT_TTL_S = 0
# A failed job stays visible to RQ tools (its traceback) this long, and never longer than the
# pipeline keeps the failed document (failed_ttl).
FAILURE_TTL_S = 7 * 24 * 3600


def entry_phase(spec: Pipeline, name: str, input_kind: str) -> str:
    """The entry phase that takes a document called ``name`` arriving as ``input_kind``.

    Bytes go to a phase declared ``input: bytes`` when there is one, else to a files phase.
    """
    suffix = _suffix(name)
    candidates = [p for p in spec.entry_phases() if _accepts(spec.phases[p], suffix)]
    if not candidates:
        accepted = sorted({t for p in spec.entry_phases() for t in spec.phases[p].accepts})
        raise DocumentError(
            f"{name}: unsupported type {suffix or '(no extension)'!r}",
            fix=f"the pipeline accepts {', '.join(accepted)}",
        )
    preferred = [p for p in candidates if spec.phases[p].input == input_kind]
    return (preferred or candidates)[0]


def accepted_by_entry(spec: Pipeline, suffix: str) -> bool:
    """Whether an entry phase takes documents with this extension (".pdf")."""
    return any(_accepts(spec.phases[p], suffix.lower()) for p in spec.entry_phases())


def queue(connection: redis.Redis, spec: Pipeline, phase: str, priority: str = keys.NORMAL) -> LaneQueue:
    """The queue of ``phase``'s lane for documents of ``priority``."""
    return lane_queue(connection, spec.name, phase, priority)


def register_queues(connection: redis.Redis, spec: Pipeline) -> None:
    """Name every phase's lanes' queues in RQ's set of queues, so `rq info` and rq-dashboard list
    them before their first job (RQ adds a queue there only when something is enqueued to it)."""
    names = [name for phase in spec.phases for name in keys.lane_queues(spec.name, phase)]
    connection.sadd(Queue.redis_queues_keys, *(Queue.redis_queue_namespace_prefix + name for name in names))


def enqueue_phase(
    connection: redis.Redis, spec: Pipeline, phase: str, doc_id: str, doc_name: str,
    pipeline: redis.client.Pipeline | None = None, priority: str = keys.NORMAL,
) -> Job:  # fmt: skip
    """Put ``doc_id`` on the lane of ``priority`` of ``phase``'s queues, with that phase's timeout
    and retries."""
    settings = spec.phases[phase]
    return queue(connection, spec, phase, priority).enqueue_call(
        JOB_FUNCTION,
        args=(phase, doc_id),
        timeout=settings.timeout,
        retry=_retry(settings),
        result_ttl=RESULT_TTL_S,
        failure_ttl=min(FAILURE_TTL_S, spec.failed_ttl),
        description=f"{phase}: {doc_name} ({doc_id[:12]})",
        pipeline=pipeline,
    )


def _retry(settings: Phase) -> Retry | None:
    if settings.retries == 0:
        return None
    # the model bounds retries, so this list stays short; no wait is longer than the cap
    waits = [min(settings.retry_delay * 2**i, MAX_RETRY_DELAY_S) for i in range(settings.retries)]
    return Retry(max=settings.retries, interval=waits)


def _suffix(name: str) -> str:
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _accepts(phase: Phase, suffix: str) -> bool:
    return "*" in phase.accepts or suffix in phase.accepts
