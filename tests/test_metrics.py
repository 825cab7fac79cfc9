"""Job metrics: bounded per-minute buckets, quantiles from the histogram, and the status figures."""

from __future__ import annotations

import fakeredis
import pytest

from levers import metrics

NOW = 1_800_000_000.0


@pytest.fixture
def connection() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def record(connection: fakeredis.FakeRedis, outcome: str, seconds: float, at: float = NOW) -> None:
    with connection.pipeline() as pipe:
        metrics.record(pipe, "p", "chunking", outcome, seconds, now=at)
        pipe.execute()


def test_counts_busy_time_and_quantiles(connection: fakeredis.FakeRedis) -> None:
    for seconds in [0.2] * 90 + [3.0] * 10:
        record(connection, "done", seconds)
    record(connection, "failed", 1.0)

    read = metrics.read(connection, "p", "chunking", minutes=5, now=NOW)

    assert (read.done, read.failed, read.retried) == (90 + 10, 1, 0)
    assert read.busy_s == pytest.approx(90 * 0.2 + 10 * 3.0 + 1.0)
    assert 0.1 < read.quantile(0.5) <= 0.25  # type: ignore[operator]
    assert 2.5 < read.quantile(0.95) <= 5  # type: ignore[operator]
    # the jobs ran in the minute before this one (NOW is a minute's start): the rate is theirs
    assert read.throughput == pytest.approx(100 / 60)


def test_throughput_counts_from_the_first_minute_a_job_ran_in(connection: fakeredis.FakeRedis) -> None:
    # a run that began 2 min 10 s ago and finished 130 documents, one a second
    for second in range(130):
        record(connection, "done", 0.5, at=NOW - 130 + second + 1)

    read = metrics.read(connection, "p", "chunking", minutes=5, now=NOW + 10)

    # from the start of its first minute (NOW - 180), not over all five minutes (130 / 250)
    assert read.throughput == pytest.approx(130 / 190)
    # a steady trickle through the whole window counts over the whole window
    record(connection, "done", 0.5, at=NOW - 230)
    assert metrics.read(connection, "p", "chunking", minutes=5, now=NOW + 10).throughput == pytest.approx(
        131 / 250
    )


def test_only_recent_minutes_count(connection: fakeredis.FakeRedis) -> None:
    record(connection, "done", 1.0, at=NOW - 10 * 60)
    record(connection, "done", 1.0, at=NOW - 60)

    assert metrics.read(connection, "p", "chunking", minutes=5, now=NOW).done == 1
    assert metrics.read(connection, "p", "chunking", minutes=15, now=NOW).done == 2


def test_buckets_expire_so_keys_stay_bounded(connection: fakeredis.FakeRedis) -> None:
    for minute in range(10):
        record(connection, "done", 0.5, at=NOW + minute * 60 + 30)

    bucket_keys = connection.keys("levers:p:phase:chunking:metrics:*")
    assert len(bucket_keys) == 10
    assert all(0 < connection.ttl(k) <= metrics.RETENTION_MIN * 60 for k in bucket_keys)


def test_no_jobs_no_quantile(connection: fakeredis.FakeRedis) -> None:
    read = metrics.read(connection, "p", "chunking", now=NOW)
    assert read.quantile(0.5) is None and read.mean_s is None and read.throughput == 0


def test_bucket_edges() -> None:
    assert metrics.bucket_index(0.001) == 0
    assert metrics.bucket_index(0.005) == 0
    assert metrics.bucket_index(0.006) == 1
    assert metrics.bucket_index(10_000) == len(metrics.BUCKET_BOUNDS_S)


def test_calls_per_job(connection: fakeredis.FakeRedis) -> None:
    with connection.pipeline() as pipe:
        metrics.record(pipe, "p", "chunking", "done", 1.0, calls=20, now=NOW)
        metrics.record(pipe, "p", "chunking", "done", 1.0, calls=10, now=NOW)
        pipe.execute()
    assert metrics.read(connection, "p", "chunking", now=NOW).calls_per_job == 15


def test_durations_are_cumulative_and_never_expire(connection: fakeredis.FakeRedis) -> None:
    for seconds, at in [(0.2, NOW - 3 * 3600), (0.2, NOW), (3.0, NOW), (5000.0, NOW)]:
        record(connection, "done", seconds, at=at)

    totals = metrics.durations(connection, "p", "chunking")

    index = metrics.BUCKET_BOUNDS_S.index
    assert totals.cumulative[index(0.1)] == 0
    assert totals.cumulative[index(0.25)] == 2  # the job of three hours ago too
    assert totals.cumulative[index(5)] == 3
    assert totals.cumulative[-2] == 3 and totals.cumulative[-1] == totals.count == 4
    assert totals.sum_s == pytest.approx(0.4 + 3.0 + 5000.0)
    assert connection.ttl("levers:p:phase:chunking:durations") == -1
    # one field per bucket used, and the sum
    assert len(connection.hkeys("levers:p:phase:chunking:durations")) == 4


def test_durations_read_garbage_as_zero(connection: fakeredis.FakeRedis) -> None:
    connection.hset(
        "levers:p:phase:chunking:durations", mapping={"h0": "x", "h1": "-5", "sum": "nan", "h2": 3}
    )
    totals = metrics.durations(connection, "p", "chunking")
    assert (totals.cumulative[:3], totals.count, totals.sum_s) == ((0, 0, 3), 3, 0.0)


def test_a_long_jobs_busy_time_counts_in_the_minutes_it_was_busy(connection: fakeredis.FakeRedis) -> None:
    record(connection, "done", 150.0, at=NOW + 30)  # busy from NOW - 120 s to NOW + 30 s

    assert metrics.busy_minutes(NOW - 120, NOW + 30) == [
        (int(NOW // 60) - 2, 60.0), (int(NOW // 60) - 1, 60.0), (int(NOW // 60), 30.0)
    ]  # fmt: skip
    last_minute = metrics.read(connection, "p", "chunking", minutes=1, now=NOW + 30)
    assert (last_minute.busy_s, last_minute.span_s, last_minute.done) == (30.0, 30.0, 1)
    assert metrics.read(connection, "p", "chunking", minutes=3, now=NOW + 30).busy_s == 150.0


def test_busy_time_before_the_retained_minutes_is_dropped() -> None:
    spans = metrics.busy_minutes(NOW - 10 * 86400, NOW + 30)
    assert len(spans) == metrics.RETENTION_MIN
    assert sum(s for _, s in spans) == (metrics.RETENTION_MIN - 1) * 60 + 30
