"""Each document's record in Redis: attempts started and taken back."""

from __future__ import annotations

import time

import redis

from levers import metrics
from levers.documents.ledger import DocStatus, Ledger


def test_a_release_takes_back_only_the_attempt_its_job_started(connection: redis.Redis) -> None:
    ledger = Ledger(connection, "ledger")
    assert ledger.add("doc", "a.txt", "files", "first", force=False)
    ledger.start("doc", "first")
    taken_at = time.time()  # a worker takes the job again, and is killed before recording the start

    assert not ledger.released("doc", "first", taken_at)
    record = ledger.get("doc")
    assert record is not None and record.phases["first"].attempts == 1  # the earlier attempt stays

    ledger.start("doc", "first")  # this time the start is recorded, then the job goes back
    assert ledger.released("doc", "first", taken_at)
    record = ledger.get("doc")
    assert record is not None and record.phases["first"].attempts == 1
    assert record.status is DocStatus.QUEUED


def test_the_ledger_counts_every_outcome_in_the_phase_metrics(connection: redis.Redis) -> None:
    ledger = Ledger(connection, "ledger")
    for doc in ("a", "b", "c"):
        assert ledger.add(doc, f"{doc}.txt", "files", "first", force=False)
        ledger.start(doc, "first")
    with connection.pipeline() as pipe:
        ledger.finished("a", "first", 0.2, 3, "second", pipe)
        pipe.execute()
    ledger.attempt_failed("b", "first", "ValueError: flaky", final=False, seconds=0.1)
    ledger.attempt_failed("c", "first", "ValueError: bad", final=True, seconds=0.1)

    figures = metrics.read(connection, "ledger", "first")
    assert (figures.done, figures.retried, figures.failed, figures.calls) == (1, 1, 1, 3)
    assert ledger.totals("first") == {"done": 1, "retried": 1, "failed": 1}
