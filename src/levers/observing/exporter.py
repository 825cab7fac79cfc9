"""Prometheus metrics at /metrics: what `levers status` shows, read from Redis at each scrape.

The exporter runs in a process of its own, forked by the supervisor before any worker: the
supervisor forks workers all the time, and a thread serving HTTP inside it could hold a lock at
the moment of a fork and leave the child deadlocked. It ends with its supervisor, even one killed
by SIGKILL: an exporter left behind would serve stale figures and hold the port.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

import redis
from prometheus_client import start_http_server
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from levers import metrics
from levers.observing.status import METRICS_MINUTES, PhaseStatus, pipeline_status
from levers.pipeline.watching import PipelineWatcher
from levers.server.connection import Target, connect

PHASE_GAUGES: tuple[tuple[str, str, str], ...] = (
    ("queue_depth", "queued", "Jobs waiting in the phase's queue."),
    ("jobs_running", "running", "Jobs live workers hold now."),
    ("jobs_stranded", "stranded", "Jobs held by workers that are gone, until a supervisor requeues them."),
    ("oldest_wait_seconds", "oldest_wait_s", "Age of the job at the head of the queue."),
    ("workers_desired", "workers_desired", "Workers the pipeline declares, over live supervisors."),
    ("workers_alive", "workers_alive", "Workers alive: listed by a live supervisor or heard from lately."),
    ("workers_busy", "workers_busy", "Workers running a job now."),
    ("utilization_ratio", "utilization", f"Busy share of the workers' time over {METRICS_MINUTES} min."),
    ("throughput_per_second", "throughput", f"Documents finished per second over {METRICS_MINUTES} min."),
)


class StatusCollector(Collector):
    def __init__(self, watcher: PipelineWatcher, connection: redis.Redis) -> None:
        self.watcher = watcher
        self.connection = connection

    def collect(self) -> Iterator[Metric]:
        spec = self.watcher.current().spec
        status = pipeline_status(self.connection, spec)
        yield from _phase_gauges(status.phases)
        yield _job_totals(status.phases)
        yield self._durations(spec.name, [p.phase for p in status.phases])
        yield from _limit_metrics(status.limits)

    def _durations(self, pipeline: str, phases: list[str]) -> Metric:
        family = GaugeHistogramMetricFamily(
            "levers_job_duration_seconds",
            f"Job durations over the last {METRICS_MINUTES} minutes.",
            labels=["phase"],
        )
        for phase in phases:
            recent = metrics.read(self.connection, pipeline, phase, METRICS_MINUTES)
            cumulative, buckets = 0, []
            for bound, count in zip([*metrics.BUCKET_BOUNDS_S, float("inf")], recent.histogram, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", cumulative))
            family.add_metric([phase], buckets, recent.busy_s)
        return family


def _phase_gauges(phases: list[PhaseStatus]) -> Iterator[Metric]:
    for name, attribute, help_text in PHASE_GAUGES:
        family = GaugeMetricFamily(f"levers_{name}", help_text, labels=["phase"])
        for phase in phases:
            value = getattr(phase, attribute)
            if value is not None:
                family.add_metric([phase.phase], float(value))
        yield family


def _job_totals(phases: list[PhaseStatus]) -> Metric:
    family = CounterMetricFamily("levers_jobs", "Job attempts by outcome.", labels=["phase", "outcome"])
    for phase in phases:
        for outcome in ("done", "failed", "retried"):
            family.add_metric([phase.phase, outcome], float(getattr(phase, outcome)))
    return family


def _limit_metrics(limits: list[dict[str, object]]) -> Iterator[Metric]:
    in_flight = GaugeMetricFamily("levers_limit_in_flight", "Calls in flight now.", labels=["limit"])
    peak = GaugeMetricFamily("levers_limit_peak_in_flight", "Most calls ever in flight.", labels=["limit"])
    calls = CounterMetricFamily("levers_limit_calls", "Calls made under a limit.", labels=["limit"])
    limited = CounterMetricFamily("levers_limit_rate_limited", "Calls answered 429/529.", labels=["limit"])
    for limit in limits:
        label = [str(limit["name"])]
        in_flight.add_metric(label, float(limit["in_flight"]))  # type: ignore[arg-type]
        peak.add_metric(label, float(limit["peak_in_flight"]))  # type: ignore[arg-type]
        calls.add_metric(label, float(limit["calls"]))  # type: ignore[arg-type]
        limited.add_metric(label, float(limit["rate_limited"]))  # type: ignore[arg-type]
    yield from (in_flight, peak, calls, limited)


# Linux's prctl option: the signal a process receives when its parent dies.
PR_SET_PDEATHSIG = 1
# Elsewhere, how often the exporter checks that its supervisor is still there.
PARENT_CHECK_S = 1.0


def serve(watcher: PipelineWatcher, target: Target, port: int, supervisor_pid: int) -> None:
    """Body of the exporter process: serve /metrics on ``port`` until terminated, or until the
    supervisor (``supervisor_pid``) is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when this process ends
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with(supervisor_pid)
    REGISTRY.register(StatusCollector(watcher, connect(target)))
    start_http_server(port)
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
