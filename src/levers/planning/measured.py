"""What the workers measured recently, as `levers plan` uses it: job time, CPU per job, throughput.

The figures come from the per-minute buckets of levers.metrics over the last ``WINDOW_MIN``
minutes, each minute weighted down by half every ``HALF_LIFE_MIN`` minutes of age: a plan follows
a change of job times within minutes (an hour's mean lagged a run whose jobs grew slower), and
one quiet minute does not erase it. The current minute counts for the part of it that has passed.

A job's time is its handler's plus what taking and settling it cost its worker (the worker's
time between two jobs, waiting for work left out): for jobs of a few milliseconds that is most
of what a worker spends on each, and a plan of handler times alone promised twice the rate.

A phase's throughput counts from the first minute of the window it was busy in; when the minute
before that one was idle, the phase started part-way through it, so that minute is left out
(unless it is the only one), else a run that began 50 s into a minute would read as slower than
it was.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import redis

from levers.metrics import BUCKET_S, minute_buckets

WINDOW_MIN = 15
HALF_LIFE_MIN = 5.0

Buckets = Mapping[int, Mapping[str, float]]


@dataclass(frozen=True)
class Window:
    """The span the figures were measured over, ending ``now``."""

    now: float
    minutes: int = WINDOW_MIN
    half_life_min: float = HALF_LIFE_MIN

    def describe(self) -> str:
        return f"the last {self.minutes} min, weighted (half-life {self.half_life_min:g} min)"

    def weight(self, minute: int) -> float:
        age = int(self.now // BUCKET_S) - minute
        return float(0.5 ** (age / self.half_life_min))

    def span(self, minute: int) -> float:
        """Seconds of ``minute`` that have passed by ``now``."""
        return max(0.0, min(float(BUCKET_S), self.now - minute * BUCKET_S))


@dataclass(frozen=True)
class PhaseWindow:
    """One phase over the window. Means are weighted; ``jobs`` counts attempts, unweighted."""

    jobs: int
    job_seconds: float | None  # a worker's wall time per attempt: the handler's, then taking and settling it
    cpu_seconds: float | None  # CPU per done job, None when its workers recorded none
    docs_per_second: float  # done per second since it was first busy in the window
    busy_workers: float  # workers busy on average over that span (taking and settling jobs counted)
    gap_seconds: float | None = None  # of job_seconds, taking and settling: None when not measured


@dataclass(frozen=True)
class Measured:
    window: Window
    phases: dict[str, PhaseWindow]

    @property
    def job_seconds(self) -> dict[str, float]:
        return {n: p.job_seconds for n, p in self.phases.items() if p.job_seconds is not None}

    @property
    def cpu_seconds(self) -> dict[str, float]:
        return {n: p.cpu_seconds for n, p in self.phases.items() if p.cpu_seconds is not None}


def weigh(buckets: Buckets, window: Window) -> PhaseWindow | None:
    """One phase's figures from its minute buckets (minute -> field -> value); None when it ran
    no job in the window."""
    current = int(window.now // BUCKET_S)
    minutes = [m for m in range(current - window.minutes + 1, current + 1)]
    runs = {m: sum(buckets.get(m, {}).get(f, 0.0) for f in ("done", "failed", "retried")) for m in minutes}
    total_runs = sum(runs.values())
    if total_runs <= 0:
        return None
    weighted = {f: sum(window.weight(m) * buckets.get(m, {}).get(f, 0.0) for m in minutes)
                for f in ("done", "busy_s", "cpu_s", "gap_s", "gaps")}  # fmt: skip
    weighted_runs = sum(window.weight(m) * runs[m] for m in minutes)
    gap_s = weighted["gap_s"] / weighted["gaps"] if weighted["gaps"] else None
    active = _active_minutes(buckets, minutes)
    span = sum(window.weight(m) * window.span(m) for m in active)
    in_span = {f: sum(window.weight(m) * buckets.get(m, {}).get(f, 0.0) for m in active)
               for f in ("done", "busy_s", "gap_s")}  # fmt: skip
    return PhaseWindow(
        jobs=int(total_runs),
        job_seconds=weighted["busy_s"] / weighted_runs + (gap_s or 0.0) if weighted_runs else None,
        cpu_seconds=weighted["cpu_s"] / weighted["done"] if weighted["cpu_s"] and weighted["done"] else None,
        docs_per_second=in_span["done"] / span if span else 0.0,
        busy_workers=(in_span["busy_s"] + in_span["gap_s"]) / span if span else 0.0,
        gap_seconds=gap_s,
    )


def _active_minutes(buckets: Buckets, minutes: list[int]) -> list[int]:
    """The window's minutes from the first the phase was busy in, that one left out when it
    began part-way (the minute before it idle) and later ones follow."""

    def busy(minute: int) -> bool:
        bucket = buckets.get(minute, {})
        return bucket.get("busy_s", 0.0) > 0 or bucket.get("done", 0.0) > 0

    first = next((m for m in minutes if busy(m)), None)
    if first is None:
        return []
    active = [m for m in minutes if m >= first]
    if len(active) > 1 and not busy(first - 1):
        active = active[1:]
    return active


def read_measured(
    connection: redis.Redis, pipeline: str, phases: list[str], now: float, window_min: int = WINDOW_MIN
) -> Measured:
    """The window's figures of every phase that ran a job in it."""
    window = Window(now, window_min)
    found = {}
    for phase in phases:
        # one minute more than the window: whether the phase's first busy minute began part-way
        figures = weigh(minute_buckets(connection, pipeline, phase, window_min + 1, now), window)
        if figures is not None:
            found[phase] = figures
    return Measured(window, found)
