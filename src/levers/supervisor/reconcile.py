"""The supervisor: keeps each phase at its declared number of workers by reconciling, tick by tick.

Each tick: follow pipeline.yaml and the version published in Redis (levers.supervisor.following),
reap the dead (recovering the jobs they were running), then grow or shrink every phase toward its
``workers`` lever. A worker that dies soon after its start
without having started a job is crashing: it comes back with exponential backoff, and a phase
whose workers keep crashing is marked failing. One that started jobs was killed (out of memory,
kill -9, or by its job, which then fails after ``retries`` such deaths): it is replaced at once.
Shrinking retires idle workers first and never kills a running job: a retiring worker finishes
its job, then exits. A stop waits ``grace_s`` for running jobs, then cuts short the workers
still running one: their jobs go back to their queues.

A phase with ``autoscale:`` follows its queue instead (levers.supervisor.scaling): more workers
start in the tick that sees the demand, and only idle ones stop, once the lower demand has lasted
``scale_down_after`` seconds. A supervisor given ``workers`` runs that many of each of its phases
whatever the file says: on a platform whose replicas carry the count (one worker per pod).

Side effects come in through seams (``spawn``, ``recover``, ``sweep``, ``is_busy``, ``observe``,
``clock``), so tests can replay a history of deaths, edits and demand without processes.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol

from levers.observing.reports import AutoscaleReport, PhaseReport, SupervisorReport
from levers.pipeline.loading import LoadedPipeline
from levers.pipeline.model import Phase, Pipeline
from levers.pipeline.watching import PipelineWatcher
from levers.supervisor.scaling import Decision, Inputs, LimitUse, Load, Observed, Scaler, memory_cap

if TYPE_CHECKING:
    from levers.supervisor.following import Follower

log = logging.getLogger("levers.supervisor.reconcile")

# A worker that dies sooner than this after its start, having started no job, counts as a crash.
QUICK_CRASH_S = 10.0
# Waits before restarting a crashing phase: first, then doubling, up to the cap.
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
# Consecutive crashes after which a phase is reported as failing (it keeps being retried).
FAILING_AFTER_CRASHES = 5


class ProcessHandle(Protocol):
    """What the supervisor needs of a worker process (multiprocessing.Process fits)."""

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None: ...

    @property
    def jobs_started(self) -> int:
        """Jobs whose handler the worker started (read after its death: did it ever work?)."""
        ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


class SlotState(StrEnum):
    RUNNING = "running"
    RETIRING = "retiring"  # asked to stop after its current job
    CUT_SHORT = "cut short"  # killed by the supervisor: a stop's grace ran out, a second signal, or
    # another supervisor took its jobs over


class PhaseState(StrEnum):
    OK = "ok"
    BACKOFF = "backoff"  # waiting to restart a crashed worker
    FAILING = "failing"  # workers keep crashing
    STOPPED = "stopped"


@dataclass
class Slot:
    phase: str
    handler: str
    process: ProcessHandle
    started_at: float
    state: SlotState = SlotState.RUNNING

    @property
    def pid(self) -> int:
        return self.process.pid or 0


@dataclass
class PhaseHealth:
    crashes: int = 0
    restarts: int = 0
    next_spawn_at: float = 0.0

    def state(self, now: float) -> PhaseState:
        if self.crashes >= FAILING_AFTER_CRASHES:
            return PhaseState.FAILING
        return PhaseState.BACKOFF if now < self.next_spawn_at else PhaseState.OK


@dataclass
class Seams:
    """The supervisor's side effects. ``recover`` puts back the jobs of a dead worker; ``sweep``,
    called every tick, finishes what needs a second look later (``wait``: on the last tick)."""

    spawn: Callable[[str, LoadedPipeline], ProcessHandle]
    recover: Callable[[Slot], list[str]]
    sweep: Callable[[bool], object] = lambda wait: None
    is_busy: Callable[[Slot], bool] = lambda slot: False
    # what autoscaled phases need to decide: their queues, limits, peers, and free memory
    observe: Callable[[Pipeline, list[str]], Observed] = lambda spec, phases: Observed({}, {}, {})
    clock: Callable[[], float] = time.monotonic


@dataclass
class Supervisor:
    watcher: PipelineWatcher
    seams: Seams
    only: frozenset[str] = frozenset()  # phases to run; empty means all
    slots: list[Slot] = field(default_factory=list)
    health: dict[str, PhaseHealth] = field(default_factory=dict)
    grace_s: float | None = None  # how long a stop waits for running jobs; None: the longest timeout
    stopping: bool = False
    stop_deadline: float | None = None
    # as other supervisors know this one: its report's id
    id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    scalers: dict[str, Scaler] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    workers: int | None = None  # per phase, over the file's workers and autoscale: the platform scales
    # the published pipeline it follows (None: the file alone, as in tests of the loop)
    follower: Follower | None = None

    def desired(self, loaded: LoadedPipeline | None = None) -> dict[str, int]:
        """Workers wanted per phase this host runs, from ``loaded`` (default: the current pipeline)."""
        spec = (loaded or self.watcher.current()).spec
        return {
            name: (0 if self.stopping else self._wanted(name, phase))
            for name, phase in spec.phases.items()
            if not self.only or name in self.only
        }

    def _wanted(self, name: str, phase: Phase) -> int:
        if self.workers is not None:
            return self.workers
        if phase.autoscale is None:
            return phase.levers.workers
        decision = self.decisions.get(name)
        if decision is None:  # no tick has decided yet: the starting count
            return min(max(phase.levers.workers, phase.autoscale.min), phase.autoscale.max)
        return decision.desired

    def tick(self) -> None:
        """One reconcile pass: reap, retire what is stale or surplus, spawn the shortfall.

        A seam that raises ends the pass; the next one takes up where it stopped (a dead worker
        stays in ``slots``, not replaced, until its jobs are recovered)."""
        if self.follower is not None and not self.stopping:
            self.follower.tick()
        loaded = self.watcher.current()
        if self.stopping:
            self._enforce_stop_deadline()  # first: a stop must end even while recovery cannot
        self._reap()
        self.seams.sweep(self.finished())
        if self.stopping:
            return
        self._retire_stale(loaded)
        self._autoscale(loaded.spec)
        desired = self.desired(loaded)  # one version of the file for the whole tick
        for phase, wanted in desired.items():
            self._reconcile_phase(loaded, phase, wanted)
        for phase in {s.phase for s in self.slots} - set(desired):
            self._retire(self._running(phase))

    def finished(self) -> bool:
        return self.stopping and not self.slots

    def stop_overdue(self) -> bool:
        """Stopping, and past the time the stop may take (at once, for a forced stop)."""
        return self.stopping and self.stop_deadline is not None and self.seams.clock() >= self.stop_deadline

    def request_stop(self, force: bool = False) -> None:
        """First call: let running jobs finish. ``force`` (or a second call): stop at once."""
        # stopping is set first: a second signal can arrive while this call is still running
        force = force or self.stopping
        self.stopping = True
        now = self.seams.clock()
        if force:
            log.warning("stopping now: running jobs go back to the head of their queues")
            self.stop_deadline = now
            self._cut_short()
            return
        grace = self.grace_s
        if grace is None:
            grace = max((p.timeout for p in self.watcher.current().spec.phases.values()), default=0)
        log.info("stopping: workers finish their current job first (up to %g s)", grace)
        self.stop_deadline = now + grace
        for slot in self.slots:
            self._retire_one(slot)

    def replace_workers(self, pids: set[int]) -> None:
        """Kill these workers at once, without counting crashes; new ones replace them. For workers
        whose jobs another supervisor has taken over: finishing them would be wasted work."""
        for slot in self.slots:
            if slot.pid in pids:
                slot.state = SlotState.CUT_SHORT
                slot.process.kill()

    def report(self) -> SupervisorReport:
        """Per phase: desired, alive, retiring, state, restarts, pids; and any pipeline.yaml error."""
        now = self.seams.clock()
        phases = {}
        for phase, wanted in self.desired().items():
            health = self.health.get(phase, PhaseHealth())
            # a dead worker stays in slots until its jobs are recovered: it is not reported
            mine = [s for s in self.slots if s.phase == phase and s.process.exitcode is None]
            phases[phase] = PhaseReport(
                desired=wanted,
                alive=sum(s.state is SlotState.RUNNING for s in mine),
                retiring=sum(s.state is SlotState.RETIRING for s in mine),
                state=PhaseState.STOPPED if self.stopping else health.state(now),
                restarts=health.restarts,
                pids=[s.pid for s in mine],
                autoscale=self._autoscale_report(phase),
            )
        return SupervisorReport(
            host=socket.gethostname(),
            pid=os.getpid(),
            updated=time.time(),
            digest=self.watcher.current().digest,
            config_error=self.watcher.error or (self.follower.error if self.follower else None),
            memory_percent=None,
            phases=phases,
            version=self.follower.version.number if self.follower and self.follower.version else None,
        )

    def _autoscale_report(self, phase: str) -> AutoscaleReport | None:
        decision = self.decisions.get(phase)
        if decision is None:
            return None
        return AutoscaleReport(decision.min, decision.max, decision.ceiling, decision.reason)

    def _autoscale(self, spec: Pipeline) -> None:
        """Decide every autoscaled phase's workers from what ``observe`` reads. Phases decided
        first take their new workers' memory out of what the next ones may use."""
        phases = [
            n
            for n, p in spec.phases.items()
            if p.autoscale and self.workers is None and (not self.only or n in self.only)
        ]
        for gone in set(self.scalers) - set(phases):
            del self.scalers[gone]
            self.decisions.pop(gone, None)
        if not phases:
            return
        observed = self.seams.observe(spec, phases)
        now = self.seams.clock()
        free_mb = observed.free_mb
        for name in phases:
            phase = spec.phases[name]
            assert phase.autoscale is not None
            current = len(self._running(name))
            ram_mb = phase.resources.ram_mb if phase.resources else None
            cap = None if free_mb is None else memory_cap(current, free_mb, observed.total_mb, ram_mb)
            limits = tuple(
                LimitUse(limit, observed.learned.get(limit, declared), limit in observed.learned)
                for limit in sorted(observed.limits_used.get(name, frozenset()))
                if limit in spec.limits and (declared := spec.limits[limit].concurrency)
            )
            inputs = Inputs(observed.loads.get(name, Load(0, 0)), phase.levers.semaphore, limits, cap,
                            observed.peers.get(name, ()))  # fmt: skip
            scaler = self.scalers.setdefault(name, Scaler(now, self._wanted(name, phase)))
            decision = scaler.decide(phase.autoscale, self.id, inputs, now)
            before = self.decisions.get(name)
            if before is None or before.desired != decision.desired:
                log.info("%s: autoscale %s -> %d (%s)", name, before.desired if before else "start",
                         decision.desired, decision.reason)  # fmt: skip
            self.decisions[name] = decision
            if free_mb is not None and ram_mb:
                free_mb -= max(0, decision.desired - current) * ram_mb

    def _reap(self) -> None:
        now = self.seams.clock()
        for slot in [s for s in self.slots if s.process.exitcode is not None]:
            recovered = self.seams.recover(slot)
            self.slots.remove(slot)
            # a worker asked to stop may die of that signal before RQ installs its handlers
            if slot.state is not SlotState.RUNNING or self.stopping:
                if recovered:
                    log.warning("requeued %d job(s) of stopped worker %s", len(recovered), slot.pid)
                continue
            log.warning(
                "worker %s of %s exited with %s; requeued %d job(s)",
                slot.pid, slot.phase, slot.process.exitcode, len(recovered),
            )  # fmt: skip
            self._count_death(slot, now)

    def _count_death(self, slot: Slot, now: float) -> None:
        health = self.health.setdefault(slot.phase, PhaseHealth())
        health.restarts += 1
        if slot.process.jobs_started == 0 and now - slot.started_at < QUICK_CRASH_S:
            health.crashes += 1
            delay = min(FIRST_BACKOFF_S * 2 ** (health.crashes - 1), MAX_BACKOFF_S)
            health.next_spawn_at = now + delay
            if health.crashes == FAILING_AFTER_CRASHES:
                log.error(
                    "phase %s is failing: its workers crashed %d times in a row", slot.phase, health.crashes
                )
        else:
            health.crashes = 0
            health.next_spawn_at = now

    def _retire_stale(self, loaded: LoadedPipeline) -> None:
        """Workers started for a handler the file no longer names are replaced, gracefully."""
        phases = loaded.spec.phases
        for slot in self._running():
            if slot.phase in phases and phases[slot.phase].handler != slot.handler:
                log.info(
                    "%s: replacing worker %s after its current job: the handler changed", slot.phase, slot.pid
                )
                self._retire_one(slot)

    def _reconcile_phase(self, loaded: LoadedPipeline, phase: str, wanted: int) -> None:
        running = self._running(phase)
        if len(running) > wanted:
            if loaded.spec.phases[phase].autoscale is not None:
                self._scale_down(phase, running, wanted)
                return
            # idle workers go first, then the youngest
            surplus = sorted(running, key=lambda s: (self.seams.is_busy(s), -s.started_at))
            retired = surplus[: len(running) - wanted]
            log.info(
                "%s: stopping %d worker(s) (pid %s) after their current job, to have %d",
                phase, len(retired), ", ".join(str(s.pid) for s in retired), wanted,
            )  # fmt: skip
            self._retire(retired)
            return
        health = self.health.setdefault(phase, PhaseHealth())
        now = self.seams.clock()
        if len(running) < wanted and now >= health.next_spawn_at:
            pids = []
            for _ in range(wanted - len(running)):
                if self.stopping:  # a stop signal arrived during this tick
                    break
                slot = Slot(phase, loaded.spec.phases[phase].handler, self.seams.spawn(phase, loaded), now)
                self.slots.append(slot)
                pids.append(str(slot.pid))
                if self.stopping:  # ...while this worker was being started: it was not asked to stop
                    self._retire_one(slot)
            if pids:
                log.info(
                    "%s: started %d worker(s) (pid %s) to have %d", phase, len(pids), ", ".join(pids), wanted
                )

    def _scale_down(self, phase: str, running: list[Slot], wanted: int) -> None:
        """Stop idle workers only, the youngest first: a busy one stays until a later tick finds it
        idle. One that takes a job as it is stopped still runs it (a job it took ahead goes back)."""
        idle = sorted((s for s in running if not self.seams.is_busy(s)), key=lambda s: -s.started_at)
        retired = idle[: len(running) - wanted]
        if retired:
            log.info(
                "%s: autoscale stopping %d idle worker(s) (pid %s) to have %d",
                phase, len(retired), ", ".join(str(s.pid) for s in retired), wanted,
            )  # fmt: skip
            self._retire(retired)

    def _running(self, phase: str | None = None) -> list[Slot]:
        return [s for s in self.slots if s.state is SlotState.RUNNING and (phase is None or s.phase == phase)]

    def _retire(self, slots: list[Slot]) -> None:
        for slot in slots:
            self._retire_one(slot)

    def _retire_one(self, slot: Slot) -> None:
        if slot.state is SlotState.RUNNING:
            slot.state = SlotState.RETIRING
            slot.process.terminate()

    def _enforce_stop_deadline(self) -> None:
        if self.stop_deadline is not None and self.seams.clock() >= self.stop_deadline:
            if any(s.state is not SlotState.CUT_SHORT and s.process.exitcode is None for s in self.slots):
                log.warning("the stop's grace is over: running jobs go back to the head of their queues")
            self._cut_short()

    def _cut_short(self) -> None:
        """Kill the workers still alive; their jobs go back to their queues (``recover``)."""
        for slot in self.slots:
            # one that exited stays in its slot until its jobs are recovered: nothing to kill
            if slot.state is not SlotState.CUT_SHORT and slot.process.exitcode is None:
                slot.state = SlotState.CUT_SHORT
                slot.process.kill()
