"""Per-phase job metrics in Redis, bounded in size whatever the traffic.

Each finished attempt adds to two places. Its phase's bucket for the current minute (jobs done,
failed and retried, a duration histogram over fixed log-spaced bounds, the CPU seconds of the done
ones; its busy seconds go to the minutes it was busy) gives the recent figures `levers status`
and `levers plan` show; supervisors add their workers' seconds alive to the same buckets. Buckets
expire after ``RETENTION_MIN`` minutes. Its phase's
running totals (a count per histogram bucket, the count and the sum of durations, never reset)
are the cumulative histogram Prometheus takes rates of; one hash of fixed fields per phase.
Recording is a few commands queued on a pipeline the caller executes anyway, so it adds no round
trip to a job.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import redis

from levers import keys

# Upper bounds of the duration histogram's buckets, in seconds; a last bucket takes the rest.
BUCKET_BOUNDS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500,
)  # fmt: skip
RETENTION_MIN = 120
BUCKET_S = 60


@dataclass(frozen=True)
class PhaseMetrics:
    """One phase's figures over a span of recent minutes."""

    span_s: float
    done: int
    failed: int
    retried: int
    busy_s: float
    histogram: tuple[int, ...]
    calls: int = 0
    cpu_s: float = 0.0  # CPU seconds the done jobs' worker processes spent on them
    active_s: float = 0.0  # of span_s, from the start of the first minute a job ran in
    alive_s: float = 0.0  # worker-seconds the supervisors' workers were alive in the span

    @property
    def throughput(self) -> float:
        """Documents finished per second since the span's first minute with a job in it: a run
        that began 70 s ago is not averaged over five minutes it was not running."""
        return self.done / self.active_s if self.active_s else 0.0

    @property
    def calls_per_job(self) -> float:
        runs = self.done + self.failed + self.retried
        return self.calls / runs if runs else 0.0

    @property
    def mean_s(self) -> float | None:
        runs = self.done + self.failed + self.retried
        return self.busy_s / runs if runs else None

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of job durations, interpolated within its histogram bucket."""
        total = sum(self.histogram)
        if total == 0:
            return None
        rank = q * total
        seen = 0
        for index, count in enumerate(self.histogram):
            if count and seen + count >= rank:
                low = BUCKET_BOUNDS_S[index - 1] if index > 0 else 0.0
                high = BUCKET_BOUNDS_S[index] if index < len(BUCKET_BOUNDS_S) else low * 2
                return low + (high - low) * (rank - seen) / count
            seen += count
        return BUCKET_BOUNDS_S[-1]


def bucket_index(seconds: float) -> int:
    return bisect.bisect_left(BUCKET_BOUNDS_S, seconds)


def record(
    pipe: redis.client.Pipeline,
    pipeline: str,
    phase: str,
    outcome: str,
    seconds: float,
    calls: int = 0,
    now: float | None = None,
    cpu_s: float | None = None,
    gap_s: float | None = None,
) -> None:
    """Queue on ``pipe`` the counting of one attempt: ``outcome`` is done, failed or retried;
    ``calls`` is how many calls it made through ctx.gather and ctx.map; ``cpu_s`` the CPU seconds
    its worker process spent on it, all threads counted; ``gap_s`` its worker's time between the
    job before and this one, not waiting for it (both given for done attempts; ``gaps`` counts
    the attempts that gave one)."""
    ended = now if now is not None else time.time()
    key = keys.phase_metrics(pipeline, phase, int(ended // BUCKET_S))
    pipe.hincrby(key, outcome, 1)
    pipe.hincrby(key, f"h{bucket_index(seconds)}", 1)
    if calls:
        pipe.hincrby(key, "calls", calls)
    if cpu_s is not None and math.isfinite(cpu_s) and cpu_s > 0:
        pipe.hincrbyfloat(key, "cpu_s", cpu_s)
    if gap_s is not None and math.isfinite(gap_s) and gap_s >= 0:
        pipe.hincrbyfloat(key, "gap_s", gap_s)
        pipe.hincrby(key, "gaps", 1)
    pipe.expire(key, RETENTION_MIN * BUCKET_S)
    for minute, busy_s in busy_minutes(ended - seconds, ended):
        busy_key = keys.phase_metrics(pipeline, phase, minute)
        pipe.hincrbyfloat(busy_key, "busy_s", busy_s)
        pipe.expire(busy_key, RETENTION_MIN * BUCKET_S)
    totals = keys.phase_durations(pipeline, phase)
    pipe.hincrby(totals, f"h{bucket_index(seconds)}", 1)
    pipe.hincrbyfloat(totals, "sum", seconds)


def record_alive(
    pipe: redis.client.Pipeline, pipeline: str, phase: str, workers: int, started: float, ended: float
) -> None:
    """Queue on ``pipe`` the worker-seconds ``workers`` workers were alive from ``started`` to
    ``ended``, in the minutes they fall in: what utilization divides by, so that it counts the
    workers a scale-down stopped for the time they ran."""
    for minute, seconds in busy_minutes(started, ended):
        key = keys.phase_metrics(pipeline, phase, minute)
        pipe.hincrbyfloat(key, "alive_s", workers * seconds)
        pipe.expire(key, RETENTION_MIN * BUCKET_S)


def busy_minutes(started: float, ended: float) -> list[tuple[int, float]]:
    """The seconds from ``started`` to ``ended`` per minute they fell in (the retained minutes
    only): a long job's busy time counts in the minutes it was busy, not all in its last one."""
    first = max(int(started // BUCKET_S), int(ended // BUCKET_S) - RETENTION_MIN + 1)
    spans = []
    for minute in range(first, int(ended // BUCKET_S) + 1):
        seconds = min(ended, (minute + 1) * BUCKET_S) - max(started, minute * BUCKET_S)
        if seconds > 0:
            spans.append((minute, seconds))
    return spans


def read(
    connection: redis.Redis, pipeline: str, phase: str, minutes: int = 5, now: float | None = None
) -> PhaseMetrics:
    """The current minute and the ``minutes - 1`` whole ones before it, summed; their span is
    what has passed of them, so a figure per second does not count the rest of this minute."""
    at = now if now is not None else time.time()
    current = int(at // BUCKET_S)
    totals: dict[str, float] = {}
    buckets = minute_buckets(connection, pipeline, phase, minutes, at)
    for bucket in buckets.values():
        for name, value in bucket.items():
            totals[name] = totals.get(name, 0.0) + value
    ran = [minute for minute, bucket in buckets.items() if any(bucket.get(f) for f in _ACTIVITY)]
    histogram = tuple(int(totals.get(f"h{i}", 0)) for i in range(len(BUCKET_BOUNDS_S) + 1))
    return PhaseMetrics(
        span_s=(minutes - 1) * BUCKET_S + (at - current * BUCKET_S),
        done=int(totals.get("done", 0)),
        failed=int(totals.get("failed", 0)),
        retried=int(totals.get("retried", 0)),
        busy_s=totals.get("busy_s", 0.0),
        histogram=histogram,
        calls=int(totals.get("calls", 0)),
        cpu_s=totals.get("cpu_s", 0.0),
        active_s=(current - min(ran)) * BUCKET_S + (at - current * BUCKET_S) if ran else 0.0,
        alive_s=totals.get("alive_s", 0.0),
    )


# A minute with any of these had a job in it (busy_s: one that ran then, whenever it ended).
_ACTIVITY = ("done", "failed", "retried", "busy_s")


def minute_buckets(
    connection: redis.Redis, pipeline: str, phase: str, minutes: int, now: float
) -> dict[int, dict[str, float]]:
    """The buckets of the current minute and the ``minutes - 1`` before it, by minute, each field
    a number (a field that is not one, which levers never writes, reads as 0)."""
    current = int(now // BUCKET_S)
    span = range(current - minutes + 1, current + 1)
    with connection.pipeline(transaction=False) as pipe:
        for minute in span:
            pipe.hgetall(keys.phase_metrics(pipeline, phase, minute))
        raw = pipe.execute()
    return {m: {_text(k): _number(v) for k, v in bucket.items()} for m, bucket in zip(span, raw, strict=True)}


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _number(value: bytes | str) -> float:
    try:
        number = float(value)
    except ValueError:
        return 0.0
    return number if math.isfinite(number) else 0.0


@dataclass(frozen=True)
class Durations:
    """A phase's job durations since its first job: a cumulative histogram, as Prometheus has it."""

    cumulative: tuple[int, ...]  # jobs at or under each of BUCKET_BOUNDS_S, then all of them
    count: int
    sum_s: float


def durations(connection: redis.Redis, pipeline: str, phase: str) -> Durations:
    """The running totals of a phase's job durations; zeros before its first job."""
    raw = connection.hgetall(keys.phase_durations(pipeline, phase))
    fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}
    running, cumulative = 0, []
    for index in range(len(BUCKET_BOUNDS_S) + 1):
        running += _count(fields.get(f"h{index}"))
        cumulative.append(running)
    # the count is what the buckets add up to: read in one command, they always agree
    return Durations(tuple(cumulative), running, _seconds(fields.get("sum")))


def _count(value: bytes | str | None) -> int:
    try:
        return max(0, int(value)) if value is not None else 0
    except ValueError:
        return 0


def _seconds(value: bytes | str | None) -> float:
    try:
        seconds = float(value) if value is not None else 0.0
    except ValueError:
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0
