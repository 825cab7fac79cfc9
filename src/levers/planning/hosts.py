"""The hosts a plan runs on, and the CPU they can give all their phases together. Pure.

A host has cores and memory, and runs some of each phase's workers: a phase's documents are
shared among its hosts in proportion to the workers each runs (a what-if that changes a phase's
workers keeps the proportions). A phase that no host runs yet is shared evenly among them all.

With the CPU seconds one job of a phase costs (measured by its workers), the cores of a host bound
what it can do: the phases it runs, at ``rate`` documents/s each, need sum(share x rate x CPU per
job) cores, at most its cores. Declared ``resources.cpu`` (per worker, while busy) only warns: it
is a reservation, not a measurement. A host's cores are those other programs left over the last
minute (its supervisors report the CPU the host used and the part their own processes took): on
a shared machine, levers' workers cannot have the cores another program keeps busy.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import psutil

from levers.observing.reports import SupervisorReport, usable_cores

# A host's workers get at least this share of its cores, however busy other programs keep it.
MIN_FREE_SHARE = 0.05
# Other programs' CPU below this many cores is the noise of sampling the host and the workers
# at different moments: not counted.
OTHERS_NOISE = 0.1


@dataclass(frozen=True)
class Host:
    """A machine that runs workers. ``workers`` is phase -> workers it runs; None runs every
    phase (the local machine, when no supervisor reports)."""

    name: str
    cores: float
    memory_mb: float | None = None
    workers: Mapping[str, int] | None = None
    local: bool = False  # the machine plan runs on, standing in for hosts that do not report
    others: float = 0.0  # cores other programs kept busy over the last minute

    @property
    def free_cores(self) -> float:
        """The cores levers' workers can have: the host's, less what other programs use (never
        none: the scheduler still gives the workers a share)."""
        return max(self.cores - self.others, self.cores * MIN_FREE_SHARE)

    def describe_cores(self) -> str:
        taken = f" ({self.others:.1f} busy with other programs)" if self.others else ""
        return f"{self.cores:g}{taken}"


def local_host() -> Host:
    """The machine plan runs on, running every phase: the host when no supervisor reports."""
    return Host(socket.gethostname(), usable_cores(), psutil.virtual_memory().total / 2**20, None, local=True)


def hosts_from_reports(reports: Iterable[SupervisorReport]) -> tuple[Host, ...]:
    """One host per host name the live supervisors report from (several supervisors on one host
    share its cores), with the workers each runs per phase and the cores other programs kept
    busy; reports without cores (an older levers) count one core per alive worker, the least
    they run on."""
    by_host: dict[str, list[SupervisorReport]] = {}
    for report in reports:
        by_host.setdefault(report.host, []).append(report)
    local = socket.gethostname()
    return tuple(_host(name, found, local) for name, found in sorted(by_host.items()))


def _host(name: str, reports: list[SupervisorReport], local: str) -> Host:
    workers: dict[str, int] = {}
    for report in reports:
        for phase, figures in report.phases.items():
            workers[phase] = workers.get(phase, 0) + figures.alive
    cores = max((float(r.cores) for r in reports if r.cores), default=0.0)  # one machine: shared
    memory = next((r.memory_mb for r in reversed(reports) if r.memory_mb), None)
    return Host(name, cores or float(max(1, sum(workers.values()))), memory, workers, name == local,
                _others(reports))  # fmt: skip


def _others(reports: list[SupervisorReport]) -> float:
    """The cores the host's programs other than levers' supervisors and workers kept busy: what
    it used less what each supervisor says its own processes took (0 when one does not say)."""
    if any(r.busy_cores is None or r.own_cores is None for r in reports):
        return 0.0
    others = max(r.busy_cores or 0.0 for r in reports) - sum(r.own_cores or 0.0 for r in reports)
    return others if others >= OTHERS_NOISE else 0.0


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
        return self.host.free_cores / self.cpu if self.cpu else 1.0


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
    cores = {h.name: h.free_cores for h in hosts}
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
    cores = {h.name: h.free_cores for h in hosts}
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
        if total > host.free_cores * (1 + 1e-9):
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
