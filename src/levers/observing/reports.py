"""What supervisors tell the rest of the pipeline through Redis: their reports and their leases.

A supervisor publishes a report about once a second (its host's cores and memory; per phase:
workers desired, alive and retiring, health, restarts, pids, CPU and memory) and renews a lease on
every tick (see levers.supervisor.leases). `levers status`, `levers plan`, the exporter and
`levers set` read both here, typed, without importing the supervisor or the worker.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from levers import keys

# A supervisor's report older than this is stale: its host is gone.
REPORT_TTL_S = 10.0


@dataclass(frozen=True)
class AutoscaleReport:
    """An autoscaled phase's bounds on one host, the most it can run there, and why it wants what
    it wants (the demand, then every cap that bites)."""

    min: int
    max: int
    ceiling: int
    reason: str


@dataclass(frozen=True)
class PhaseReport:
    """One phase as one supervisor runs it."""

    desired: int
    alive: int
    retiring: int
    state: str  # ok, backoff, failing or stopped
    restarts: int
    pids: list[int]
    cpu_percent: float | None = None  # mean over its workers, % of one core since the last report
    rss_mb: float | None = None  # mean over its workers
    autoscale: AutoscaleReport | None = None  # for a phase with autoscale:

    @property
    def settled(self) -> bool:
        return self.alive == self.desired


@dataclass(frozen=True)
class SupervisorReport:
    """A supervisor's latest report, written by it and read by any host."""

    host: str
    pid: int
    updated: float  # when it was published, by the supervisor's clock
    digest: str  # of the pipeline.yaml it runs
    config_error: str | None  # why the file's latest edit was not taken up
    memory_percent: float | None  # of its host
    phases: dict[str, PhaseReport] = field(default_factory=dict)
    cpu_percent: float | None = None  # of its host's cores together, over the last minute
    cores: int | None = None  # its host's, as far as it may use them (`levers plan` caps by them)
    memory_mb: float | None = None  # its host's total
    busy_cores: float | None = None  # its host's cores busy over the last minute, every program's work
    own_cores: float | None = None  # of them, what this supervisor and its workers used
    version: int | None = None  # the number of the published pipeline version it runs
    store: str | None = None  # where its artifact store is (levers.supervisor.reporting.store_identity)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: bytes | str) -> SupervisorReport | None:
        """A report from Redis; None when it is malformed."""
        try:
            data = json.loads(raw)
            phases = {str(name): _phase_report(figures) for name, figures in dict(data.pop("phases")).items()}
            return cls(**data, phases=phases)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


def _phase_report(figures: dict[str, Any]) -> PhaseReport:
    autoscale = figures.pop("autoscale", None)
    return PhaseReport(**figures, autoscale=AutoscaleReport(**autoscale) if autoscale is not None else None)


def usable_cores() -> int:
    """The cores this process may run on (a CPU affinity or cpuset counts), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def live_reports(connection: redis.Redis, pipeline: str) -> list[SupervisorReport]:
    """Reports of the supervisors that are alive now, on any host."""
    now = time.time()
    reports = [SupervisorReport.from_json(raw) for raw in connection.hvals(keys.supervisors(pipeline))]
    return [r for r in reports if r is not None and now - r.updated < REPORT_TTL_S]


@dataclass(frozen=True)
class LeaseRecord:
    """What a lease says about its supervisor: written by it, read by `levers status` and takers."""

    host: str
    pid: int
    phases: list[str]
    version: str  # the digest of the pipeline.yaml it runs
    workers: dict[str, list[str]] = field(default_factory=dict)  # phase -> its workers' RQ names

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, raw: bytes | str) -> LeaseRecord:
        """A record from Redis; whatever is malformed reads as unknown, with no workers."""
        try:
            data = json.loads(raw)
            workers = {str(p): [str(n) for n in names] for p, names in dict(data.get("workers", {})).items()}
            return cls(str(data["host"]), int(data["pid"]), [str(p) for p in data["phases"]],
                       str(data["version"]), workers)  # fmt: skip
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls(host="?", pid=0, phases=[], version="?")


@dataclass(frozen=True)
class SupervisorLease:
    """One supervisor as `levers status` shows it."""

    id: str
    host: str
    pid: int
    phases: list[str]
    version: str
    workers: int
    lease_age_s: float | None  # since its last renewal, by the server's clock
    lapsed: bool  # it stopped renewing: its jobs go (or went) to another supervisor


def supervisor_leases(connection: redis.Redis, pipeline: str) -> list[SupervisorLease]:
    """Every supervisor that holds a lease, or held one that no supervisor has taken over yet."""
    with connection.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.lease_records(pipeline))
        pipe.hgetall(keys.lease_renewals(pipeline))
        pipe.time()
        raw_records, raw_renewals, (seconds, micros) = pipe.execute()
    records = {_text(k): LeaseRecord.from_json(v) for k, v in raw_records.items()}
    renewals = {_text(k): _number(v) for k, v in raw_renewals.items()}
    ids = sorted(records)
    with connection.pipeline(transaction=False) as pipe:
        for supervisor in ids:
            pipe.exists(keys.lease(pipeline, supervisor))
        alive = pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    return [
        _shown(i, records[i], renewals.get(i), now_ms, bool(live)) for i, live in zip(ids, alive, strict=True)
    ]


def _shown(
    supervisor: str, record: LeaseRecord, renewed_ms: float | None, now_ms: int, live: bool
) -> SupervisorLease:
    age = round(max(0.0, now_ms - renewed_ms) / 1000, 1) if renewed_ms is not None else None
    workers = sum(len(names) for names in record.workers.values())
    return SupervisorLease(supervisor, record.host, record.pid, record.phases, record.version, workers, age,
                           lapsed=not live)  # fmt: skip


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _number(value: bytes | str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None
