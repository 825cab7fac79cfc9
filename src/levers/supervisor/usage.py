"""What a supervisor measures of its host for its report: the host's CPU over the last minute,
the part of it that the supervisor and its workers used (so `levers plan` can tell the cores
other programs take from the ones levers' workers can have), and each phase's workers' CPU and
memory."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class CpuUse:
    """The host's CPU over the last minute."""

    percent: float  # of all its cores together
    busy_cores: float  # cores busy on average, every program's work
    own_cores: float  # of those, what the supervisor and its workers used


class HostCpu:
    """The host's CPU use over the last minute, all cores together: a one-second sample is
    noise, and the seed's "CPU consistently above 80 %" is about a sustained load."""

    WINDOW_S = 60.0

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float, float, float]] = deque()  # (when, busy s, total s, own s)

    def measure(self, now: float, own_cpu_s: float) -> CpuUse | None:
        """The use since the oldest sample of the last minute; ``own_cpu_s``: the CPU seconds
        the supervisor and its workers used so far, counted by ``ProcessUsage``."""
        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        total = sum(times)
        self._samples.append((now, total - idle, total, own_cpu_s))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.WINDOW_S:
            self._samples.popleft()
        _, busy_then, total_then, own_then = self._samples[0]
        elapsed = total - total_then  # CPU seconds of every core together
        if elapsed <= 0:
            return None
        cores = psutil.cpu_count() or 1
        busy = total - idle - busy_then
        return CpuUse(
            percent=round(100 * busy / elapsed, 1),
            busy_cores=round(cores * busy / elapsed, 2),
            own_cores=round(cores * max(0.0, own_cpu_s - own_then) / elapsed, 2),
        )


class ProcessUsage:
    """The workers' CPU and memory, per phase, and the CPU seconds the supervisor and its workers
    used in all (a worker's seconds count from when it was first seen; a worker that ends between
    two samples loses its last moments)."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}
        self._cpu_seen: dict[int, float] = {}
        self.cpu_s = 0.0

    def sample(self, pids_by_phase: Mapping[str, Iterable[int]]) -> dict[str, tuple[float, float]]:
        """Phase -> (mean CPU of its workers, % of one core since the last sample; mean RSS, MB)."""
        usage: dict[str, tuple[float, float]] = {}
        alive = {os.getpid()}
        for phase, pids in pids_by_phase.items():
            cpu, rss = [], []
            for pid in pids:
                figures = self._read(pid)
                if figures is not None:
                    alive.add(pid)
                    cpu.append(figures[0])
                    rss.append(figures[1])
            if cpu:
                usage[phase] = (round(sum(cpu) / len(cpu), 1), round(sum(rss) / len(rss), 1))
        self._read(os.getpid())
        for gone in set(self._processes) - alive:
            del self._processes[gone]
            self._cpu_seen.pop(gone, None)
        return usage

    def _read(self, pid: int) -> tuple[float, float] | None:
        try:
            process = self._processes.setdefault(pid, psutil.Process(pid))
            with process.oneshot():
                percent, times = process.cpu_percent(None), process.cpu_times()
                rss = process.memory_info().rss
        except psutil.Error:
            self._processes.pop(pid, None)
            return None
        used = times.user + times.system
        self.cpu_s += max(0.0, used - self._cpu_seen.get(pid, 0.0))
        self._cpu_seen[pid] = used
        return percent, rss / 2**20
