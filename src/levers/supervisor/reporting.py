"""A supervisor's report in Redis, where `levers status` on any host reads it: its phases'
desired and alive workers, their CPU and memory, the host's, and each phase's workers' seconds
alive (what utilization divides by)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import replace

import psutil
import redis

from levers import keys, metrics
from levers.documents.store import is_url
from levers.observing.reports import usable_cores
from levers.pipeline.loading import LoadedPipeline
from levers.server.masking import masked
from levers.server.outage import UNREACHABLE
from levers.supervisor.reconcile import Supervisor
from levers.supervisor.usage import HostCpu, ProcessUsage

log = logging.getLogger("levers.supervisor.reconcile")

# The longest span between two reports whose workers' seconds alive count (they report each second).
MAX_ALIVE_SPAN_S = 10.0


def store_identity(loaded: LoadedPipeline) -> str:
    """Which artifact store the pipeline names, told apart across supervisors: an object store's
    URL (masked), a directory's real path, and for one under ``.levers/`` (the default: one
    machine's own) its host too. Hosts that mount one shared directory at one path name it alike."""
    location = loaded.settings["store"]
    if is_url(location):
        return masked(location)
    path = (loaded.project_dir / location).resolve()
    own = path.is_relative_to(loaded.state_dir.resolve())
    return f"{socket.gethostname()}:{path}" if own else str(path)


class Reporter:
    """Publishes the supervisor's report where `levers status` on any host can read it."""

    def __init__(self, connection: redis.Redis, supervisor: Supervisor) -> None:
        self.connection = connection
        self.supervisor = supervisor
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self._last = 0.0
        self._desired: dict[str, int] = {}  # as last published
        self._alive_since: float | None = None  # the end of the span whose alive seconds were recorded
        self._usage = ProcessUsage()
        self._host_cpu = HostCpu()

    @property
    def _key(self) -> str:
        return keys.supervisors(self.supervisor.watcher.current().spec.name)

    def publish(self) -> None:
        """At most once a second, and at once when the desired counts change: a worker retired by a
        scale-down leaves within a tick, and status must not then show it short of a stale count."""
        now = time.time()
        desired = self.supervisor.desired()
        if now - self._last < 1.0 and desired == self._desired:
            return
        self._last, self._desired = now, desired
        report = self.supervisor.report()
        pids = {phase: [s.pid for s in self.supervisor.slots if s.phase == phase] for phase in report.phases}
        phases = dict(report.phases)
        for phase, (cpu_percent, rss_mb) in self._usage.sample(pids).items():
            phases[phase] = replace(phases[phase], cpu_percent=cpu_percent, rss_mb=rss_mb)
        memory = psutil.virtual_memory()
        cpu = self._host_cpu.measure(now, self._usage.cpu_s)
        report = replace(
            report,
            updated=now,
            memory_percent=memory.percent,
            cpu_percent=cpu.percent if cpu else None,
            busy_cores=cpu.busy_cores if cpu else None,
            own_cores=cpu.own_cores if cpu else None,
            phases=phases,
            cores=usable_cores(),
            memory_mb=memory.total / 2**20,
            store=store_identity(self.supervisor.watcher.current()),
        )
        try:
            with self.connection.pipeline(transaction=False) as pipe:
                pipe.hset(self._key, self.id, report.to_json())
                self._record_alive(pipe, {phase: len(figures.pids) for phase, figures in phases.items()}, now)
                pipe.execute()
        except UNREACHABLE:
            raise
        except redis.RedisError as exc:
            log.warning("could not publish status: %s", exc)

    def _record_alive(self, pipe: redis.client.Pipeline, alive: dict[str, int], now: float) -> None:
        """Each phase's workers' seconds alive since the last report; a gap longer than
        MAX_ALIVE_SPAN_S (Redis away, a stalled host) is not counted, as nothing ran to fill it."""
        since, self._alive_since = self._alive_since, now
        if since is None or not 0 < now - since <= MAX_ALIVE_SPAN_S:
            return
        pipeline = self.supervisor.watcher.current().spec.name
        for phase, workers in alive.items():
            if workers:
                metrics.record_alive(pipe, pipeline, phase, workers, since, now)

    def withdraw(self) -> None:
        with contextlib.suppress(redis.RedisError):
            self.connection.hdel(self._key, self.id)
