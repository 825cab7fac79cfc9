"""Prometheus metrics at /metrics: what `levers status` shows, read from Redis at each scrape.

The exporter runs in a process of its own, forked by the supervisor before any worker: the
supervisor forks workers all the time, and a thread serving HTTP inside it could hold a lock at
the moment of a fork and leave the child deadlocked. It ends with its supervisor, even one killed
by SIGKILL: an exporter left behind would serve stale figures and hold the port.

Every figure is the pipeline's, read from Redis, whichever host serves it; so each phase is
exported by one exporter only, and a sum over instances counts every job once. A phase belongs
to the live supervisor with the lowest lease id among those running it (any live supervisor when
none runs it); the pipeline's shared limits belong to the lowest of all. When that supervisor dies,
its lease lapses within seconds and the next one's exporter serves the phase from the same totals.
Figures Prometheus derives (throughput, utilization, quantiles) are left to it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import redis
from prometheus_client import start_http_server
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from levers import metrics
from levers.observing.reports import SupervisorLease, supervisor_leases
from levers.observing.status import PhaseStatus, pipeline_status
from levers.pipeline.watching import PipelineWatcher
from levers.server.connection import Target, connect

LABELS = ["pipeline", "phase"]

PHASE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("queue_depth", "queued", "Jobs waiting in the phase's queues, every priority lane's."),
    ("jobs_running", "running", "Jobs live workers are running now."),
    ("jobs_claimed_ahead", "claimed_ahead", "Jobs workers took while finishing the one before."),
    ("jobs_stranded", "stranded", "Jobs held by workers that are gone, until a supervisor requeues them."),
    ("jobs_waiting_retry", "waiting_retry", "Jobs waiting out a retry's backoff."),
    ("oldest_wait_seconds", "oldest_wait_s", "Age of the job at the head of the queue."),
    ("workers_desired", "workers_desired", "Workers wanted, over live supervisors: declared, or autoscaled."),
    ("workers_alive", "workers_alive", "Workers alive: listed by a live supervisor or heard from lately."),
    ("workers_busy", "workers_busy", "Workers running a job now."),
)


@dataclass(frozen=True)
class Share:
    """What one exporter serves: the phases it owns, and whether the pipeline's limits too."""

    phases: frozenset[str]
    limits: bool


def share(leases: list[SupervisorLease], host: str, pid: int, phases: list[str]) -> Share:
    """The part of the pipeline the exporter of supervisor ``host``/``pid`` serves (see the module)."""
    live = sorted((lease for lease in leases if not lease.lapsed), key=lambda lease: lease.id)
    mine = [lease.id for lease in live if (lease.host, lease.pid) == (host, pid)]
    if not mine:  # its supervisor holds no lease yet, or lost it: another serves the pipeline
        return Share(frozenset(), limits=False)
    owned = set()
    for phase in phases:
        running = [lease.id for lease in live if phase in lease.phases] or [lease.id for lease in live]
        if running[0] in mine:
            owned.add(phase)
    return Share(frozenset(owned), limits=live[0].id in mine)


class StatusCollector(Collector):
    def __init__(self, watcher: PipelineWatcher, connection: redis.Redis, supervisor_pid: int) -> None:
        self.watcher = watcher
        self.connection = connection
        self.host = socket.gethostname()
        self.supervisor_pid = supervisor_pid

    def collect(self) -> Iterator[Metric]:
        loaded = self.watcher.current()
        spec = loaded.spec
        leases = supervisor_leases(self.connection, spec.name)
        served = share(leases, self.host, self.supervisor_pid, list(spec.phases))
        status = pipeline_status(self.connection, loaded.outline)
        phases = [p for p in status.phases if p.phase in served.phases]
        yield from _phase_gauges(spec.name, phases)
        yield from _autoscale_gauges(spec.name, phases)
        yield _lane_depths(spec.name, phases)
        yield _job_totals(spec.name, phases)
        yield self._durations(spec.name, [p.phase for p in phases])
        if served.limits:
            yield from _limit_metrics(spec.name, status.limits)

    def _durations(self, pipeline: str, phases: list[str]) -> Metric:
        family = HistogramMetricFamily(
            "levers_job_duration_seconds", "How long job attempts took, by phase.", labels=LABELS
        )
        bounds = [f"{bound:g}" for bound in metrics.BUCKET_BOUNDS_S] + ["+Inf"]
        for phase in phases:
            totals = metrics.durations(self.connection, pipeline, phase)
            family.add_metric(
                [pipeline, phase], list(zip(bounds, totals.cumulative, strict=True)), totals.sum_s
            )
        return family


def _lane_depths(pipeline: str, phases: list[PhaseStatus]) -> Metric:
    family = GaugeMetricFamily(
        "levers_lane_queue_depth",
        "Jobs waiting in one priority lane of the phase (levers_queue_depth is their sum).",
        labels=[*LABELS, "lane"],
    )
    for phase in phases:
        for lane, depth in phase.lanes.items():
            family.add_metric([pipeline, phase.phase, lane], float(depth))
    return family


def _phase_gauges(pipeline: str, phases: list[PhaseStatus]) -> Iterator[Metric]:
    for name, attribute, help_text in PHASE_GAUGES:
        family = GaugeMetricFamily(f"levers_{name}", help_text, labels=LABELS)
        for phase in phases:
            value = getattr(phase, attribute)
            if value is not None:
                family.add_metric([pipeline, phase.phase], float(value))
        yield family


def _autoscale_gauges(pipeline: str, phases: list[PhaseStatus]) -> Iterator[Metric]:
    needed = GaugeMetricFamily(
        "levers_workers_needed",
        "Autoscaled phases: workers the demand calls for over all hosts, ceil((queued + running) / "
        "per_worker), capped by the shared limits the phase calls; before each host's max and memory.",
        labels=LABELS,
    )
    for phase in phases:
        if phase.autoscale is not None:
            needed.add_metric([pipeline, phase.phase], float(phase.autoscale.needed))
    yield needed


def _job_totals(pipeline: str, phases: list[PhaseStatus]) -> Metric:
    family = CounterMetricFamily("levers_jobs", "Job attempts by outcome.", labels=[*LABELS, "outcome"])
    for phase in phases:
        # a counter: failed attempts, not the failed documents kept (a purge lowers those)
        outcomes = {"done": phase.done, "failed": phase.failed_attempts, "retried": phase.retried,
                    "reused": phase.reused}  # fmt: skip
        for outcome, count in outcomes.items():
            family.add_metric([pipeline, phase.phase, outcome], float(count))
    return family


def _limit_metrics(pipeline: str, limits: list[dict[str, object]]) -> Iterator[Metric]:
    labels = ["pipeline", "limit"]
    in_flight = GaugeMetricFamily("levers_limit_in_flight", "Calls in flight now.", labels=labels)
    peak = GaugeMetricFamily("levers_limit_peak_in_flight", "Most calls ever in flight.", labels=labels)
    calls = CounterMetricFamily("levers_limit_calls", "Calls made under a limit.", labels=labels)
    limited = CounterMetricFamily("levers_limit_rate_limited", "Calls answered 429/529.", labels=labels)
    for limit in limits:
        label = [pipeline, str(limit["name"])]
        in_flight.add_metric(label, float(limit["in_flight"]))  # type: ignore[arg-type]
        peak.add_metric(label, float(limit["peak_in_flight"]))  # type: ignore[arg-type]
        calls.add_metric(label, float(limit["calls"]))  # type: ignore[arg-type]
        limited.add_metric(label, float(limit["rate_limited"]))  # type: ignore[arg-type]
    yield from (in_flight, peak, calls, limited)
    yield from _learned_metrics(pipeline, limits)


def _learned_metrics(pipeline: str, limits: list[dict[str, object]]) -> Iterator[Metric]:
    """Declared against effective figures (what the limit learned of its provider), and refusals."""
    labels = ["pipeline", "limit", "figure"]
    rate = GaugeMetricFamily(
        "levers_limit_rate", "Calls allowed per window, as declared and as effective now.", labels=labels
    )
    concurrency = GaugeMetricFamily(
        "levers_limit_concurrency", "Calls allowed at once, as declared and as effective now.", labels=labels
    )
    refused = GaugeMetricFamily(
        "levers_limit_rate_limited_last_minute", "Calls answered 429/529 in the last minute.",
        labels=["pipeline", "limit"],
    )  # fmt: skip
    for limit in limits:
        name = str(limit["name"])
        for family, declared, effective in (
            (rate, limit["requests_per_minute"], limit.get("effective_requests_per_minute")),
            (concurrency, limit["concurrency"], limit.get("effective_concurrency")),
        ):
            if declared is None:
                continue  # not declared: no figure to show
            family.add_metric([pipeline, name, "declared"], float(declared))  # type: ignore[arg-type]
            family.add_metric([pipeline, name, "effective"], float(effective or declared))  # type: ignore[arg-type]
        refused.add_metric([pipeline, name], float(limit.get("rate_limited_last_minute") or 0))  # type: ignore[arg-type]
    yield from (rate, concurrency, refused)


# Linux's prctl option: the signal a process receives when its parent dies.
PR_SET_PDEATHSIG = 1
# Elsewhere, how often the exporter checks that its supervisor is still there.
PARENT_CHECK_S = 1.0


def serve(watcher: PipelineWatcher, target: Target, host: str, port: int, supervisor_pid: int) -> None:
    """Body of the exporter process: serve /metrics on ``host``:``port`` until terminated, or
    until the supervisor (``supervisor_pid``) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when this process ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with(supervisor_pid)
    REGISTRY.register(StatusCollector(watcher, connect(target), supervisor_pid))
    start_http_server(port, addr=host)
    while True:
        signal.pause()


def _end_with(supervisor_pid: int) -> None:
    """SIGTERM this process when the supervisor dies: from the kernel on Linux, else from a thread."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    else:

        def watch() -> None:
            while os.getppid() == supervisor_pid:
                time.sleep(PARENT_CHECK_S)
            os.kill(os.getpid(), signal.SIGTERM)

        threading.Thread(target=watch, name="levers-parent-watch", daemon=True).start()
    if os.getppid() != supervisor_pid:  # it died before the kernel was told
        os.kill(os.getpid(), signal.SIGTERM)
