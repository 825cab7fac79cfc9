"""Each document's record in Redis: attempts started and taken back."""

from __future__ import annotations

import time

import redis

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
