"""The capacity model behind `levers plan`: throughput, bottleneck, latency, drain time, totals. Pure.

A phase's job time comes from a measured duration when one is given, else from its ``expect:``
block, else it is unknown and no number is made up for it. From job times:

* capacity of a phase = workers / job time (documents per second); 0 workers is zero capacity;
  with the CPU seconds a job costs (measured by the workers), at most what its hosts' cores
  allow (levers.planning.hosts);
* a path is the chain of phases a document travels from one entry phase to the end; its
  bottleneck is its lowest-capacity phase, and phases within ``TIE_TOLERANCE`` of that lowest
  capacity are all bottlenecks (the seed's extraction and kg_ingest, 3/90 and 2/60, are both),
  unless its hosts' cores, shared by all its phases at once, allow less: then they are;
* latency of one document on an empty pipeline = the sum of the job times along its path;
* a burst of N documents drains in N / the path's bottleneck capacity;
* a steady rate keeps up when it is at most the path's bottleneck capacity.

The model ignores queue waits, retries, shared ``limits:`` and the thread lever (threads change a
job's time, which a measured duration or ``expect.seconds`` already includes), and it treats each
path on its own: documents of two entry phases that share a downstream phase compete for it.
A measured job time was taken with the host as busy as it was then: more workers of a CPU-bound
phase do not shorten it, the cores cap what they add.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from levers.errors import UsageError
from levers.pipeline.model import Phase, Pipeline
from levers.planning.hosts import Demand, Host, demands, memory_short, path_cpu_cap, phase_cpu_cap

# Capacities closer than this (relative) are a tie; float division would otherwise split them.
TIE_TOLERANCE = 1e-9

Source = Literal["measured", "expect", "unknown"]


@dataclass(frozen=True)
class PhasePlan:
    """One phase's levers and what they give. ``job_seconds`` is None when nothing says it."""

    name: str
    workers: int
    semaphore: int
    threads: int
    job_seconds: float | None
    source: Source
    cpu_per_worker: float | None
    ram_mb_per_worker: float | None
    cpu_job_seconds: float | None = None  # CPU one job costs, as measured by the workers
    cpu_cap: float | None = None  # documents/s the cores of its hosts allow it alone

    @property
    def docs_per_second(self) -> float | None:
        if self.job_seconds is None:
            return None
        by_workers = self.workers / self.job_seconds
        return by_workers if self.cpu_cap is None else min(by_workers, self.cpu_cap)

    @property
    def cpu_bound(self) -> bool:
        """Whether its hosts' cores, not its workers, set its capacity."""
        return (
            self.job_seconds is not None
            and self.cpu_cap is not None
            and (self.cpu_cap < self.workers / self.job_seconds)
        )

    @property
    def docs_per_hour(self) -> float | None:
        rate = self.docs_per_second
        return None if rate is None else rate * 3600

    @property
    def cpu(self) -> float | None:
        return None if self.cpu_per_worker is None else self.workers * self.cpu_per_worker

    @property
    def ram_mb(self) -> float | None:
        return None if self.ram_mb_per_worker is None else self.workers * self.ram_mb_per_worker


@dataclass(frozen=True)
class PathPlan:
    """The phases one entry phase's documents travel, and what limits them.

    ``docs_per_second`` is the lowest known capacity on the path: the path's throughput when no
    phase is unknown, else only an upper bound on it.
    """

    entry: str
    phases: tuple[str, ...]
    bottleneck: tuple[str, ...]
    docs_per_second: float | None
    unknown: tuple[str, ...]
    stalled: tuple[str, ...]  # phases with 0 workers: documents reaching them wait forever
    latency_seconds: float | None  # None when a job time is unknown or the path is stalled
    cpu_host: str | None = None  # the host whose cores, shared by the path's phases, set its pace

    @property
    def complete(self) -> bool:
        return not self.unknown

    @property
    def limited_by(self) -> tuple[str, ...]:
        """What sets the path's pace: its bottleneck phases, or a host's cores."""
        return (f"cores of {self.cpu_host}",) if self.cpu_host else self.bottleneck


@dataclass(frozen=True)
class Totals:
    workers: int
    cpu: float  # vCPUs, over the phases that declare resources.cpu
    ram_mb: float
    missing_cpu: tuple[str, ...]  # phases with workers but no resources.cpu
    missing_ram: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    phases: dict[str, PhasePlan]
    paths: tuple[PathPlan, ...]
    hosts: tuple[Host, ...] = ()

    @property
    def bottleneck(self) -> tuple[str, ...]:
        """The lowest-capacity phases of the whole pipeline (ties all included)."""
        return lowest(self.phases.values())

    @property
    def path_bottlenecks(self) -> frozenset[str]:
        """Every phase that is the bottleneck of some path its cores do not hold back: the ones a
        view marks."""
        return frozenset(name for path in self.paths if not path.cpu_host for name in path.bottleneck)

    def share(self, phase: str) -> float | None:
        """How busy ``phase`` is when the fastest path through it runs flat out: 1.0 for a bottleneck."""
        capacity = self.phases[phase].docs_per_second
        paces = [p.docs_per_second for p in self.paths if phase in p.phases and p.docs_per_second is not None]
        if capacity is None or not paces:
            return None
        return 1.0 if capacity == 0 else max(paces) / capacity

    def totals(self) -> Totals:
        working = [p for p in self.phases.values() if p.workers > 0]
        return Totals(
            workers=sum(p.workers for p in working),
            cpu=sum(p.cpu or 0.0 for p in working),
            ram_mb=sum(p.ram_mb or 0.0 for p in working),
            missing_cpu=tuple(p.name for p in working if p.cpu is None),
            missing_ram=tuple(p.name for p in working if p.ram_mb is None),
        )

    def warnings(self) -> list[str]:
        notes = [f"{p.name} has 0 workers: no document gets past it" for p in self.phases.values()
                 if p.workers == 0]  # fmt: skip
        unknown = [p.name for p in self.phases.values() if p.job_seconds is None]
        if unknown:
            notes.append(f"no job time for {', '.join(unknown)}: add expect: or measure it")
        notes += [_demand_note(d) for d in self.cpu_demands()]
        ram = {p.name: p.ram_mb for p in self.phases.values() if p.ram_mb}
        notes += [f"the workers need {need:.0f} MB RAM; {_host_label(host)} has {host.memory_mb:.0f} MB: "
                  f"not all of them fit at once" for host, need in memory_short(self.hosts, ram)]  # fmt: skip
        return notes

    def cpu_demands(self) -> list[Demand]:
        """Hosts whose phases need more cores at the shown rates than the host has: measured CPU
        per job x the shown rate, else the declared resources.cpu of the workers."""
        need: dict[str, tuple[float, bool]] = {}
        for p in self.phases.values():
            if p.cpu_job_seconds is not None and p.docs_per_second is not None:
                need[p.name] = (p.docs_per_second * p.cpu_job_seconds, False)
            elif p.cpu is not None:
                need[p.name] = (p.cpu, True)
        return demands(self.hosts, need)


def _host_label(host: Host) -> str:
    return "this host" if host.local else f"host {host.name}"


def _demand_note(demand: Demand) -> str:
    names = list(demand.phases)
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    source = " (declared resources.cpu)" if demand.declared else ""
    host = f"{_host_label(demand.host)} has {demand.host.describe_cores()}"
    return (f"needs {demand.cpu:.1f} vCPU{source}; {host}: {listed} will run at about "
            f"{round(demand.fraction * 100)} % of the shown rate")  # fmt: skip


@dataclass(frozen=True)
class Rate:
    """A steady arrival rate, as written (``text``) and in documents per second."""

    text: str
    per_second: float


def job_seconds(phase: Phase, measured: float | None = None) -> tuple[float | None, Source]:
    """A phase's job time and where it came from; a measured duration wins over ``expect:``."""
    if measured is not None:
        return measured, "measured"
    expect = phase.expect
    if expect is None:
        return None, "unknown"
    if expect.seconds is not None:
        return expect.seconds, "expect"
    # the model guarantees calls and call_seconds whenever seconds is absent
    assert expect.calls is not None and expect.call_seconds is not None
    rounds = math.ceil(expect.calls / phase.levers.semaphore)
    return rounds * expect.call_seconds + expect.fixed_seconds, "expect"


def build_plan(
    spec: Pipeline,
    measured: Mapping[str, float] | None = None,
    cpu: Mapping[str, float] | None = None,
    hosts: Sequence[Host] = (),
) -> Plan:
    """The plan of a valid pipeline on ``hosts`` (none: cores are not counted).

    ``measured`` maps phase -> job seconds observed, ``cpu`` phase -> CPU seconds per job observed.
    A measured time was taken at the levers running then, so it does not follow a what-if on the
    semaphore: only ``expect.calls`` does.
    """
    measured, cpu = measured or {}, cpu or {}
    phases = {
        name: _phase_plan(name, phase, measured.get(name), cpu.get(name), hosts)
        for name, phase in spec.phases.items()
    }
    paths = tuple(_path_plan(entry, _chain(spec, entry), phases, hosts) for entry in spec.entry_phases())
    return Plan(phases=phases, paths=paths, hosts=tuple(hosts))


def _phase_plan(
    name: str, phase: Phase, measured: float | None, cpu: float | None, hosts: Sequence[Host]
) -> PhasePlan:
    seconds, source = job_seconds(phase, measured)
    resources = phase.resources
    return PhasePlan(
        name=name,
        workers=phase.levers.workers,
        semaphore=phase.levers.semaphore,
        threads=phase.levers.threads,
        job_seconds=seconds,
        source=source,
        cpu_per_worker=resources.cpu if resources else None,
        ram_mb_per_worker=resources.ram_mb if resources else None,
        cpu_job_seconds=cpu,
        cpu_cap=phase_cpu_cap(hosts, name, cpu),
    )


def _chain(spec: Pipeline, entry: str) -> tuple[str, ...]:
    """The phases from ``entry`` to the end, following ``next`` (a loop, which a valid file has not,
    ends the chain rather than the program)."""
    chain: list[str] = []
    current: str | None = entry
    while current is not None and current in spec.phases and current not in chain:
        chain.append(current)
        current = spec.phases[current].next
    return tuple(chain)


def _path_plan(
    entry: str, chain: tuple[str, ...], phases: Mapping[str, PhasePlan], hosts: Sequence[Host]
) -> PathPlan:
    members = [phases[name] for name in chain]
    unknown = tuple(p.name for p in members if p.job_seconds is None)
    stalled = tuple(p.name for p in members if p.workers == 0)
    bottleneck = lowest(members)
    latency = None if unknown or stalled else sum(p.job_seconds or 0.0 for p in members)
    pace = phases[bottleneck[0]].docs_per_second if bottleneck else None
    cores = path_cpu_cap(hosts, chain, {p.name: p.cpu_job_seconds for p in members})
    cpu_host = None
    if pace is not None and cores is not None and cores[0] < pace * (1 - TIE_TOLERANCE):
        pace, cpu_host = cores
    return PathPlan(
        entry=entry,
        phases=chain,
        bottleneck=bottleneck,
        docs_per_second=pace,
        unknown=unknown,
        stalled=stalled,
        latency_seconds=latency,
        cpu_host=cpu_host,
    )


def lowest(phases: Iterable[PhasePlan]) -> tuple[str, ...]:
    """Names of the lowest-capacity phases among ``phases``, ties within TIE_TOLERANCE all included."""
    known = [p for p in phases if p.docs_per_second is not None]
    if not known:
        return ()
    floor = min(p.docs_per_second or 0.0 for p in known)
    return tuple(p.name for p in known if math.isclose(p.docs_per_second or 0.0, floor,
                                                       rel_tol=TIE_TOLERANCE, abs_tol=0.0))  # fmt: skip


def drain_seconds(path: PathPlan, documents: int) -> float | None:
    """Seconds for a burst of ``documents`` to get through ``path``; None when unknown or never."""
    if not path.complete or not path.docs_per_second:
        return None
    return documents / path.docs_per_second


def keeps_up(path: PathPlan, rate: Rate) -> bool | None:
    """Whether ``path`` keeps up with ``rate``; None when a phase is unknown and the known ones
    do not already decide it (a rate above a known capacity is too much whatever the rest is)."""
    if path.docs_per_second is None:
        return None
    if rate.per_second > path.docs_per_second:
        return False
    return True if path.complete else None


_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hr": 3600.0, "hour": 3600.0, "d": 86400.0, "day": 86400.0}  # fmt: skip
_RATE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:/|per\s+)\s*([a-z]+)\s*$", re.IGNORECASE)


def parse_rate(text: str) -> Rate:
    """``10/hour``, ``0.5/s``, ``30/min`` or ``2 per day`` as documents per second.

    A bare number is refused: per second and per hour differ by 3600, too much to guess.
    """
    match = _RATE.match(text)
    unit = match.group(2).lower() if match else ""
    # plurals (hours, mins, secs); a one-letter unit has none, so "ms" is refused, not read as minutes
    if unit not in _UNITS and len(unit) > 2 and unit.endswith("s"):
        unit = unit[:-1]
    if not match or unit not in _UNITS:
        raise UsageError(f"cannot read the rate {text!r}", fix="write it as COUNT/UNIT, e.g. 10/hour, 0.5/s")
    return Rate(text=text.strip(), per_second=float(match.group(1)) / _UNITS[unit])


@dataclass(frozen=True)
class PhaseChange:
    """One phase before and after; a side is None when the phase is only in the other plan."""

    name: str
    before: PhasePlan | None
    after: PhasePlan | None

    @property
    def status(self) -> Literal["added", "removed", "changed", "same"]:
        if self.before is None:
            return "added"
        if self.after is None:
            return "removed"
        return "same" if self.before == self.after else "changed"


@dataclass(frozen=True)
class PathChange:
    """One entry phase's path before and after (matched by entry phase)."""

    entry: str
    before: PathPlan | None
    after: PathPlan | None

    @property
    def moved(self) -> bool:
        """Whether the bottleneck is a different set of phases (a tie gained or lost counts)."""
        old = set(self.before.limited_by) if self.before else set()
        new = set(self.after.limited_by) if self.after else set()
        return old != new


@dataclass(frozen=True)
class PlanDiff:
    before: Plan
    after: Plan
    phases: tuple[PhaseChange, ...]
    paths: tuple[PathChange, ...]

    @property
    def bottleneck_moved(self) -> bool:
        """Whether the pipeline's slowest phase(s) changed."""
        return set(self.before.bottleneck) != set(self.after.bottleneck)

    @property
    def moved(self) -> bool:
        """Whether any bottleneck moved: the pipeline's, or that of some path."""
        return self.bottleneck_moved or any(p.moved for p in self.paths)


def diff_plans(before: Plan, after: Plan) -> PlanDiff:
    """Phase by phase and path by path, in ``after``'s order with phases only ``before`` has last."""
    names = [*after.phases, *(n for n in before.phases if n not in after.phases)]
    phases = tuple(PhaseChange(n, before.phases.get(n), after.phases.get(n)) for n in names)
    old_paths = {p.entry: p for p in before.paths}
    new_paths = {p.entry: p for p in after.paths}
    entries = [*new_paths, *(e for e in old_paths if e not in new_paths)]
    paths = tuple(PathChange(e, old_paths.get(e), new_paths.get(e)) for e in entries)
    return PlanDiff(before=before, after=after, phases=phases, paths=paths)
