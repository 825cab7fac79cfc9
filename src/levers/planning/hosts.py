"""The hosts a plan runs on, and the CPU they can give all their phases together. Pure.

A host has cores and memory, and runs some of each phase's workers: a phase's documents are
shared among its hosts in proportion to the workers each runs (a what-if that changes a phase's
workers keeps the proportions). A phase that no host runs yet is shared evenly among them all.

With the CPU seconds one job of a phase costs (measured by its workers), the cores of a host bound
what it can do: the phases it runs, at ``rate`` documents/s each, need sum(share x rate x CPU per
job) cores, at most its cores. Declared ``resources.cpu`` (per worker, while busy) only warns: it
is a reservation, not a measurement.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from levers.observing.reports import SupervisorReport, usable_cores


@dataclass(frozen=True)
class Host:
    """A machine that runs workers. ``workers`` is phase -> workers it runs; None runs every
    phase (the local machine, when no supervisor reports)."""

    name: str
    cores: float
    memory_mb: float | None = None
    workers: Mapping[str, int] | None = None
    local: bool = False  # the machine plan runs on, standing in for hosts that do not report


def local_host() -> Host:
    """The machine plan runs on, running every phase: the host when no supervisor reports."""
    return Host(socket.gethostname(), usable_cores(), psutil.virtual_memory().total / 2**20, None, local=True)


def hosts_from_reports(reports: Iterable[SupervisorReport]) -> tuple[Host, ...]:
    """One host per host name the live supervisors report from (several supervisors on one host
    share its cores), with the workers each runs per phase; reports without cores (an older
    levers) count one core per alive worker, the least they run on."""
    hosts: dict[str, tuple[float, float | None, dict[str, int]]] = {}
    for report in reports:
        cores, memory, workers = hosts.get(report.host, (0.0, None, {}))
        for phase, figures in report.phases.items():
            workers[phase] = workers.get(phase, 0) + figures.alive
        if report.cores:
            cores = max(cores, float(report.cores))  # one machine: its supervisors share the cores
        memory = report.memory_mb if report.memory_mb else memory
        hosts[report.host] = (cores, memory, workers)
    local = socket.gethostname()
    return tuple(
        Host(name, cores or float(max(1, sum(workers.values()))), memory, workers, local=name == local)
        for name, (cores, memory, workers) in sorted(hosts.items())
    )


@dataclass(frozen=True)
class Demand:
    """The cores a host's phases need at the rates shown, when that is more than it has."""

    host: Host
    cpu: float
    phases: tuple[str, ...]  # the phases that need them, the hungriest first
    declared: bool  # some of the figure comes from resources.cpu, not from measured CPU

    @property
    def fraction(self) -> float:
        """The share of the shown rate those phases get when they all run at once."""
        return self.host.cores / self.cpu if self.cpu else 1.0


def shares(hosts: Sequence[Host], phase: str) -> dict[str, float]:
    """Host name -> the share of ``phase``'s documents it takes."""
    if not hosts:
        return {}
    counts = {h.name: 1.0 if h.workers is None else float(h.workers.get(phase, 0)) for h in hosts}
    total = sum(counts.values())
    if total <= 0:
        return {h.name: 1.0 / len(hosts) for h in hosts}
    return {name: count / total for name, count in counts.items() if count > 0}


def phase_cpu_cap(hosts: Sequence[Host], phase: str, cpu_per_job: float | None) -> float | None:
    """The most documents/s ``phase`` can do alone on its hosts' cores; None when unbounded or unknown."""
    if not cpu_per_job or cpu_per_job <= 0:
        return None
    cores = {h.name: h.cores for h in hosts}
    caps = [cores[name] / (share * cpu_per_job) for name, share in shares(hosts, phase).items()]
    return min(caps, default=None)


def path_cpu_cap(
    hosts: Sequence[Host], phases: Sequence[str], cpu_per_job: Mapping[str, float | None]
) -> tuple[float, str] | None:
    """The most documents/s a path of ``phases`` can carry on the cores of its hosts, every phase
    running at that rate at once, and the host that sets it; None when no phase's CPU is known."""
    need: dict[str, float] = {}
    for phase in phases:
        cost = cpu_per_job.get(phase)
        if cost:
            for name, share in shares(hosts, phase).items():
                need[name] = need.get(name, 0.0) + share * cost
    cores = {h.name: h.cores for h in hosts}
    caps = [(cores[name] / cpu, name) for name, cpu in need.items() if cpu > 0]
    return min(caps, default=None)


def demands(hosts: Sequence[Host], cpu_at_rate: Mapping[str, tuple[float, bool]]) -> list[Demand]:
    """Hosts whose phases need more cores than they have: ``cpu_at_rate`` is phase -> (vCPUs it
    needs at the rate shown, whether that figure is declared rather than measured)."""
    found = []
    for host in hosts:
        needs = {}
        declared = False
        for phase, (cpu, from_file) in cpu_at_rate.items():
            share = shares(hosts, phase).get(host.name, 0.0)
            if share * cpu > 0:
                needs[phase] = share * cpu
                declared = declared or from_file
        total = sum(needs.values())
        if total > host.cores * (1 + 1e-9):
            hungriest = tuple(sorted(needs, key=lambda p: -needs[p]))
            found.append(Demand(host, total, hungriest, declared))
    return found


def memory_short(hosts: Sequence[Host], ram_per_phase: Mapping[str, float]) -> list[tuple[Host, float]]:
    """Hosts whose workers need more RAM than the host has: (host, MB needed). ``ram_per_phase``
    is phase -> MB all its workers need."""
    short = []
    for host in hosts:
        if host.memory_mb is None:
            continue
        need = sum(shares(hosts, phase).get(host.name, 0.0) * mb for phase, mb in ram_per_phase.items())
        if need > host.memory_mb:
            short.append((host, need))
    return short
