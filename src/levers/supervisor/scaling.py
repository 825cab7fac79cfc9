"""Autoscaling: how many workers an autoscaled phase wants on this host, decided tick by tick.

Pure: the supervisor hands in what it read (the phase's queued and running jobs on every host, the
other hosts that run it, the shared limits its jobs call, this host's free memory) and the time.

- Need: ceil((queued + running) / per_worker) workers over all hosts.
- Caps on what can be used: a shared limit with a concurrency keeps at most
  ceil(concurrency / semaphore) workers busy; this host holds no more workers than its memory
  (``resources.ram_mb`` each) fits.
- Sharing: hosts running the phase split the need (water-filling: each host at most its own
  ceiling, the rest on the others), every host computing the same split from the same reports,
  instead of each adding the maximum.
- Up at once, down slowly: the count is the highest recommendation over the last
  ``scale_down_after`` seconds (Kubernetes' stabilization window), so noise does not flap it and a
  burst is answered in the tick that sees it. The window starts with ``workers``, the starting count.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from levers.limits.status import workers_for
from levers.pipeline.model import Autoscale

# Memory a host keeps free for what its workers allocate beyond their declared ram_mb.
MEMORY_RESERVE = 0.10


@dataclass(frozen=True)
class Load:
    """A phase's jobs over every host."""

    queued: int
    running: int


@dataclass(frozen=True)
class LimitUse:
    """A shared limit the phase's jobs call, and how many calls it allows at once: the
    concurrency it learned from the provider's refusals where that is below the declared one."""

    name: str
    concurrency: int
    learned: bool = False

    def workers(self, semaphore: int) -> int:
        """Workers that keep the limit's every slot busy, each making ``semaphore`` calls at once."""
        return workers_for(self.concurrency, semaphore)


@dataclass(frozen=True)
class Peer:
    """Another supervisor running the phase autoscaled: its id and the most workers it can run."""

    id: str
    ceiling: int


@dataclass(frozen=True)
class Observed:
    """What the supervisor reads for its autoscaled phases once a tick."""

    loads: dict[str, Load]
    limits_used: dict[str, frozenset[str]]  # phase -> the shared limits its jobs called lately
    peers: dict[str, tuple[Peer, ...]]  # phase -> the other supervisors running it autoscaled
    free_mb: float | None = None  # this host's available memory; None: not known
    total_mb: float = 0.0
    learned: dict[str, int] = field(default_factory=dict)  # limit -> concurrency learned below the declared


@dataclass(frozen=True)
class Inputs:
    load: Load
    semaphore: int = 1
    limits: tuple[LimitUse, ...] = ()
    memory_cap: int | None = None  # workers this host's memory holds for the phase; None: unknown
    peers: tuple[Peer, ...] = ()


@dataclass(frozen=True)
class Decision:
    desired: int
    min: int
    max: int
    ceiling: int  # the most this host can run now: max, or fewer when its memory holds fewer
    reasons: tuple[str, ...]  # the demand, then every cap that bites

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def memory_cap(current: int, free_mb: float, total_mb: float, ram_mb: float | None) -> int | None:
    """Workers of a phase this host holds: those running, and as many more as fit in its free
    memory less a reserve. None when the phase declares no ``ram_mb``."""
    if not ram_mb:
        return None
    usable = free_mb - MEMORY_RESERVE * total_mb
    return current + max(0, math.floor(usable / ram_mb))


def share(total: int, me: str, ceiling: int, peers: tuple[Peer, ...]) -> int:
    """This host's part of ``total`` workers: hosts with the lowest ceilings are filled first, each
    with an even part of what is left, so every host computes the same split from the same inputs."""
    hosts = sorted([(ceiling, me), *((p.ceiling, p.id) for p in peers)])
    left = total
    for index, (most, host) in enumerate(hosts):
        part = min(most, math.ceil(left / (len(hosts) - index)))
        if host == me:
            return max(0, part)
        left -= part
    return 0


@dataclass
class Scaler:
    """One phase's autoscaling on this host; it keeps the recommendations of its window."""

    started_at: float
    start_count: int
    # (time, recommendation), recommendations decreasing: the window's highest is the first
    _window: deque[tuple[float, int]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self._window.append((self.started_at, self.start_count))

    def decide(self, settings: Autoscale, me: str, inputs: Inputs, now: float) -> Decision:
        jobs = inputs.load.queued + inputs.load.running
        need = math.ceil(jobs / settings.per_worker)
        reasons = [f"demand {need} ({jobs} jobs / {settings.per_worker} per worker)"]
        limit = _tightest(inputs.limits, inputs.semaphore)
        usable = need if limit is None else min(need, limit.workers(inputs.semaphore))
        ceiling = settings.max if inputs.memory_cap is None else min(settings.max, inputs.memory_cap)
        mine = share(usable, me, ceiling, inputs.peers) if inputs.peers else usable
        if inputs.peers:
            reasons.append(f"shared by {len(inputs.peers) + 1} hosts: {mine} here")
        if mine > settings.max:
            reasons.append(f"max {settings.max}")
        elif mine < settings.min:
            reasons.append(f"min {settings.min}")
        recommended = min(max(mine, settings.min), settings.max)
        held = self._held(now, recommended, settings.scale_down_after)
        desired = min(max(held, settings.min), settings.max)
        if limit is not None and limit.workers(inputs.semaphore) < max(need, desired):
            desired = min(desired, limit.workers(inputs.semaphore))
            reasons.append(
                f"limit cap {limit.workers(inputs.semaphore)} ({limit.name}: {limit.concurrency} at once"
                f"{' (learned)' if limit.learned else ''} / semaphore {inputs.semaphore})"
            )
        if inputs.memory_cap is not None and inputs.memory_cap < desired:
            desired = inputs.memory_cap
            reasons.append(f"memory cap {inputs.memory_cap}")
        if desired > recommended:
            reasons.append(f"window: {desired} until {settings.scale_down_after:g} s of lower demand")
        return Decision(desired, settings.min, settings.max, ceiling, tuple(reasons))

    def _held(self, now: float, recommended: int, window_s: float) -> int:
        """The highest recommendation over the last ``window_s`` seconds, this one included."""
        while self._window and self._window[-1][1] <= recommended:
            self._window.pop()
        self._window.append((now, recommended))
        while self._window[0][0] < now - window_s:
            self._window.popleft()
        return self._window[0][1]


def _tightest(limits: tuple[LimitUse, ...], semaphore: int) -> LimitUse | None:
    """The shared limit that keeps the fewest workers busy."""
    return min(limits, key=lambda limit: limit.workers(semaphore), default=None)
