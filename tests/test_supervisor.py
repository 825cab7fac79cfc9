"""The supervisor's reconcile loop, replayed with fake processes and a fake clock.

Each test writes a tiny pipeline.yaml, ticks the supervisor, and plays out deaths and edits by
setting exit codes, moving the clock and rewriting the file; no process is ever started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
import redis

from levers import keys
from levers.observing.reports import PhaseReport, live_reports
from levers.pipeline.loading import LoadedPipeline
from levers.pipeline.watching import PipelineWatcher
from levers.supervisor.reconcile import (
    FAILING_AFTER_CRASHES,
    FIRST_BACKOFF_S,
    MAX_BACKOFF_S,
    QUICK_CRASH_S,
    PhaseState,
    ProcessHandle,
    Seams,
    Slot,
    SlotState,
    Supervisor,
)
from levers.supervisor.reporting import Reporter
from levers.supervisor.scaling import Observed

EXTRACT_TIMEOUT_S = 60
CHUNK_TIMEOUT_S = 120


def pipeline_text(
    extract_workers: int = 2,
    chunk_workers: int = 1,
    chunk_handler: str = "json:loads",
    with_chunk: bool = True,
) -> str:
    """extract (-> chunk), with the levers a test turns; handlers are never imported here."""
    extract = f"""\
  extract:
    handler: json:dumps
    accepts: [pdf]
    timeout: {EXTRACT_TIMEOUT_S}
    levers:
      workers: {extract_workers}
"""
    if not with_chunk:
        return "phases:\n" + extract
    chunk = f"""\
  chunk:
    handler: {chunk_handler}
    timeout: {CHUNK_TIMEOUT_S}
    levers:
      workers: {chunk_workers}
"""
    return "phases:\n" + extract + "    next: chunk\n" + chunk


@dataclass
class FakeProcess:
    """A worker process whose death the test decides, recording the signals it was sent."""

    pid: int
    exitcode: int | None = None
    jobs_started: int = 0
    signals: list[str] = field(default_factory=list)

    def terminate(self) -> None:
        self.signals.append("terminate")

    def kill(self) -> None:
        self.signals.append("kill")


@dataclass
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Harness:
    """A supervisor wired to fakes, and the history of what it did through its seams."""

    def __init__(self, path: Path, only: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.clock = FakeClock()
        self.spawned: list[tuple[str, LoadedPipeline, FakeProcess]] = []  # (phase, pipeline, process)
        self.recovered: list[Slot] = []
        self.busy: set[int] = set()
        self.sweeps: list[bool] = []  # each tick's sweep: whether it was told to wait (the last tick)
        seams = Seams(
            spawn=self._spawn, recover=self._recover, sweep=self.sweeps.append, is_busy=self._is_busy,
            clock=self.clock,
        )  # fmt: skip
        self.supervisor = Supervisor(PipelineWatcher.open(path), seams, only=only)

    def _spawn(self, phase: str, loaded: LoadedPipeline) -> FakeProcess:
        process = FakeProcess(pid=100 + len(self.spawned))
        self.spawned.append((phase, loaded, process))
        return process

    def _recover(self, slot: Slot) -> list[str]:
        self.recovered.append(slot)
        return []

    def _is_busy(self, slot: Slot) -> bool:
        return slot.pid in self.busy

    def tick(self) -> None:
        self.supervisor.tick()

    def edit(self, text: str) -> None:
        """Rewrite pipeline.yaml so the watcher sees it on the next tick."""
        before = self.path.stat().st_mtime_ns
        self.path.write_text(text)
        if self.path.stat().st_mtime_ns == before:  # a coarse filesystem clock must not hide the edit
            os.utime(self.path, ns=(before + 1_000_000, before + 1_000_000))

    def running(self, phase: str) -> list[FakeProcess]:
        """The processes of ``phase`` the supervisor counts as running (not retiring), oldest first."""
        live = [s.process for s in self.supervisor.slots if s.phase == phase and s.state is SlotState.RUNNING]
        return [p for p in self.all_processes() if any(p is q for q in live)]

    def spawned_for(self, phase: str) -> list[FakeProcess]:
        return [process for p, _, process in self.spawned if p == phase]

    def phase_report(self, phase: str) -> PhaseReport:
        return self.supervisor.report().phases[phase]

    def all_processes(self) -> list[FakeProcess]:
        return [process for _, _, process in self.spawned]


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text())
    return Harness(path)


def single_phase_harness(tmp_path: Path, workers: int = 1) -> Harness:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text(extract_workers=workers, with_chunk=False))
    return Harness(path)


# --- spawning ------------------------------------------------------------------------------------


def test_spawns_exactly_the_declared_workers_per_phase(harness: Harness) -> None:
    harness.tick()
    harness.tick()

    assert len(harness.spawned_for("extract")) == 2
    assert len(harness.spawned_for("chunk")) == 1
    assert {phase: r.alive for phase, r in harness.supervisor.report().phases.items()} == {
        "extract": 2,
        "chunk": 1,
    }
    assert harness.phase_report("extract").state == PhaseState.OK
    assert harness.phase_report("extract").pids == [p.pid for p in harness.spawned_for("extract")]


def test_only_restricts_the_phases_run(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(pipeline_text())
    only_chunk = Harness(path, only=frozenset({"chunk"}))

    only_chunk.tick()

    assert [phase for phase, _, _ in only_chunk.spawned] == ["chunk"]
    assert list(only_chunk.supervisor.report().phases) == ["chunk"]


def test_a_fixed_count_overrides_workers_and_autoscale(tmp_path: Path) -> None:
    """`levers up --workers 1`: a platform's replicas carry the count, one worker per pod."""
    path = tmp_path / "pipeline.yaml"
    autoscaled = "    autoscale: {min: 3, max: 5}\n"
    path.write_text(pipeline_text(extract_workers=4).replace("  chunk:\n", "  chunk:\n" + autoscaled))
    fixed = Harness(path)
    fixed.supervisor.workers = 1

    def no_demand(spec: object, phases: list[str]) -> Observed:
        raise AssertionError(f"autoscaling consulted for {phases}: the platform scales these")

    fixed.supervisor.seams.observe = no_demand
    fixed.tick()
    fixed.tick()

    assert len(fixed.spawned_for("extract")) == len(fixed.spawned_for("chunk")) == 1
    assert {phase: r.desired for phase, r in fixed.supervisor.report().phases.items()} == {
        "extract": 1,
        "chunk": 1,
    }


# --- deaths and crashes --------------------------------------------------------------------------


def test_a_dead_worker_is_recovered_and_replaced(harness: Harness) -> None:
    harness.tick()
    victim = harness.spawned_for("extract")[0]
    harness.clock.advance(QUICK_CRASH_S * 10)

    victim.exitcode = -9
    harness.tick()

    [slot] = harness.recovered
    assert slot.process is victim
    assert (slot.phase, slot.handler) == ("extract", "json:dumps")
    assert victim not in harness.running("extract")
    assert len(harness.running("extract")) == 2
    assert len(harness.spawned_for("extract")) == 3
    assert harness.phase_report("extract").restarts == 1
    assert harness.phase_report("extract").state == PhaseState.OK


def test_a_recovery_that_cannot_reach_redis_is_tried_again_and_the_worker_not_replaced_meanwhile(
    harness: Harness,
) -> None:
    harness.tick()
    victim = harness.spawned_for("extract")[0]
    harness.clock.advance(QUICK_CRASH_S * 10)
    redis_down = True

    def recover(slot: Slot) -> list[str]:
        if redis_down:
            raise redis.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        harness.recovered.append(slot)
        return []

    harness.supervisor.seams.recover = recover
    victim.exitcode = -9
    for _ in range(3):
        with pytest.raises(redis.ConnectionError):
            harness.tick()
    assert len(harness.spawned_for("extract")) == 2, "replaced only once its jobs are back"
    assert victim.pid not in harness.phase_report("extract").pids  # nor reported alive meanwhile

    redis_down = False
    harness.tick()

    assert [slot.process for slot in harness.recovered] == [victim]
    assert len(harness.running("extract")) == 2
    assert len(harness.spawned_for("extract")) == 3


def test_a_stop_ends_at_its_deadline_while_recovery_cannot_reach_redis(harness: Harness) -> None:
    harness.tick()
    processes = harness.all_processes()

    def unreachable(slot: Slot) -> list[str]:
        raise redis.ConnectionError("Connection refused")

    harness.supervisor.seams.recover = unreachable
    harness.supervisor.request_stop()
    processes[0].exitcode = 0  # one finished its job and left; its jobs cannot be looked at
    harness.clock.advance(max(EXTRACT_TIMEOUT_S, CHUNK_TIMEOUT_S))  # the default grace
    with pytest.raises(redis.ConnectionError):
        harness.tick()

    assert processes[0].signals == ["terminate"]
    assert all(p.signals == ["terminate", "kill"] for p in processes[1:])
    assert harness.supervisor.stop_overdue()  # the loop gives up on recovering, rather than wait forever


def crash_current_worker(h: Harness) -> FakeProcess:
    """The one running extract worker dies right away, and the supervisor notices."""
    [process] = h.running("extract")
    process.exitcode = 1
    h.tick()
    return process


def test_quick_repeated_crashes_back_off_exponentially_then_fail(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path)
    h.tick()

    for crash in range(1, FAILING_AFTER_CRASHES + 1):
        crashed_at = h.clock.now
        crash_current_worker(h)
        backoff = min(FIRST_BACKOFF_S * 2 ** (crash - 1), MAX_BACKOFF_S)
        spawned = len(h.spawned)
        assert h.running("extract") == []
        expected_state = PhaseState.FAILING if crash >= FAILING_AFTER_CRASHES else PhaseState.BACKOFF
        assert h.phase_report("extract").state == expected_state

        h.clock.now = crashed_at + backoff - 0.01
        h.tick()
        assert len(h.spawned) == spawned, f"respawned during backoff after crash {crash}"

        h.clock.now = crashed_at + backoff
        h.tick()
        assert len(h.spawned) == spawned + 1, f"not respawned once the backoff after crash {crash} ended"

    report = h.phase_report("extract")
    assert report.state == PhaseState.FAILING
    assert report.restarts == FAILING_AFTER_CRASHES
    assert report.alive == 1  # a failing phase keeps being retried


def test_workers_killed_after_finishing_jobs_are_replaced_at_once_and_never_make_the_phase_fail(
    tmp_path: Path,
) -> None:
    h = single_phase_harness(tmp_path)
    h.tick()

    for kill in range(1, FAILING_AFTER_CRASHES * 3 + 1):
        h.clock.advance(1.0)  # each dies a second after its start, well within QUICK_CRASH_S
        [worker] = h.running("extract")
        worker.jobs_started = 3
        worker.exitcode = -9
        h.tick()

        assert len(h.spawned) == kill + 1, f"kill {kill}: not replaced in the same tick"
        assert h.phase_report("extract").state == PhaseState.OK

    assert h.phase_report("extract").restarts == FAILING_AFTER_CRASHES * 3


def test_a_kill_between_crashes_resets_the_crash_count(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path)
    h.tick()
    for crash in range(1, FAILING_AFTER_CRASHES):
        crash_current_worker(h)
        h.clock.advance(FIRST_BACKOFF_S * 2 ** (crash - 1))
        h.tick()

    [worker] = h.running("extract")
    worker.jobs_started = 1  # it worked, then was killed
    crash_current_worker(h)

    assert len(h.running("extract")) == 1
    crash_current_worker(h)  # a crash after it starts the count again: no failing phase
    assert h.phase_report("extract").state == PhaseState.BACKOFF


def test_a_long_lived_worker_dying_resets_the_crash_count(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path)
    h.tick()
    for crash in range(1, 4):
        crash_current_worker(h)
        h.clock.advance(FIRST_BACKOFF_S * 2 ** (crash - 1))
        h.tick()

    h.clock.advance(QUICK_CRASH_S + 1)
    crash_current_worker(h)

    assert len(h.running("extract")) == 1, "a worker that lived long is replaced without backoff"
    assert h.phase_report("extract").state == PhaseState.OK

    spawned = len(h.spawned)
    crash_current_worker(h)
    h.clock.advance(FIRST_BACKOFF_S)
    h.tick()
    assert len(h.spawned) == spawned + 1, "the next quick crash waits only the first backoff"


# --- live edits ----------------------------------------------------------------------------------


def test_lowering_workers_retires_idle_workers_first_without_killing(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path, workers=3)
    h.tick()
    first, second, third = h.spawned_for("extract")
    h.busy = {first.pid, third.pid}

    h.edit(pipeline_text(extract_workers=2, with_chunk=False))
    h.tick()

    assert second.signals == ["terminate"]
    assert first.signals == third.signals == []
    report = h.phase_report("extract")
    assert (report.desired, report.alive, report.retiring) == (2, 2, 1)

    h.edit(pipeline_text(extract_workers=0, with_chunk=False))
    h.tick()

    assert all(p.signals == ["terminate"] for p in (first, second, third))
    assert len(h.spawned) == 3


def test_among_busy_workers_the_youngest_retires_first(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path, workers=1)
    h.tick()
    h.clock.advance(100)
    h.edit(pipeline_text(extract_workers=2, with_chunk=False))
    h.tick()
    old, young = h.spawned_for("extract")
    h.busy = {old.pid, young.pid}

    h.edit(pipeline_text(extract_workers=1, with_chunk=False))
    h.tick()

    assert (old.signals, young.signals) == ([], ["terminate"])


def test_a_retired_worker_that_exits_is_not_a_crash_and_not_replaced(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path, workers=2)
    h.tick()
    h.edit(pipeline_text(extract_workers=1, with_chunk=False))
    h.tick()
    [retired] = [p for p in h.spawned_for("extract") if p.signals]

    retired.exitcode = 0
    h.tick()

    assert [s.process for s in h.recovered] == [retired]
    assert len(h.spawned) == 2
    report = h.phase_report("extract")
    assert (report.alive, report.retiring, report.restarts) == (1, 0, 0)
    assert report.state == PhaseState.OK


def test_raising_workers_spawns_more(harness: Harness) -> None:
    harness.tick()
    before = harness.spawned_for("extract")

    harness.edit(pipeline_text(extract_workers=5))
    harness.tick()

    assert harness.spawned_for("extract")[:2] == before
    assert len(harness.running("extract")) == 5
    assert all(p.signals == [] for p in harness.all_processes())


def test_changing_a_handler_replaces_that_phases_workers(harness: Harness) -> None:
    harness.tick()
    [old] = harness.spawned_for("chunk")
    extract_workers = harness.spawned_for("extract")

    harness.edit(pipeline_text(chunk_handler="json:load"))
    harness.tick()

    assert old.signals == ["terminate"]
    [(_, loaded, new)] = [s for s in harness.spawned if s[0] == "chunk" and s[2] is not old]
    assert loaded.spec.phases["chunk"].handler == "json:load"
    assert [s.handler for s in harness.supervisor.slots if s.process is new] == ["json:load"]
    assert harness.running("chunk") == [new]
    assert harness.spawned_for("extract") == extract_workers
    assert all(p.signals == [] for p in extract_workers)


def test_a_phase_removed_from_the_file_has_its_workers_retired(harness: Harness) -> None:
    harness.tick()
    [chunk_worker] = harness.spawned_for("chunk")

    harness.edit(pipeline_text(with_chunk=False))
    harness.tick()

    assert chunk_worker.signals == ["terminate"]
    assert "chunk" not in harness.supervisor.report().phases


def test_an_invalid_edit_keeps_the_workers_and_reports_the_error(harness: Harness) -> None:
    harness.tick()

    harness.edit(pipeline_text(extract_workers=-1))
    harness.tick()

    assert len(harness.running("extract")) == 2
    assert all(p.signals == [] for p in harness.all_processes())
    error = harness.supervisor.report().config_error
    assert isinstance(error, str)
    assert "phases.extract.levers.workers" in error


# --- stopping ------------------------------------------------------------------------------------


def test_request_stop_terminates_all_and_finishes_once_they_exit(harness: Harness) -> None:
    harness.tick()
    processes = harness.all_processes()

    harness.supervisor.request_stop()
    harness.tick()

    assert all(p.signals == ["terminate"] for p in processes)
    assert not harness.supervisor.finished()
    assert harness.phase_report("extract").state == PhaseState.STOPPED

    for p in processes[:-1]:
        p.exitcode = 0
    harness.tick()
    assert not harness.supervisor.finished()

    processes[-1].exitcode = -15
    harness.tick()
    assert harness.supervisor.finished()
    # every tick sweeps; the last one waits for what a worker that died while stopping left behind
    assert harness.sweeps == [False] * (len(harness.sweeps) - 1) + [True]
    assert len(harness.spawned) == len(processes), "nothing is respawned while stopping"
    assert [s.process for s in harness.recovered] == processes
    assert all("kill" not in p.signals for p in processes)


@pytest.mark.parametrize("during", [1, 2])
def test_a_stop_signal_during_a_tick_that_starts_workers_stops_every_worker(
    harness: Harness, during: int
) -> None:
    """The signal handler runs between two statements of a tick: after the n-th worker's start."""
    spawn = harness.supervisor.seams.spawn

    def spawn_then_signal(phase: str, loaded: LoadedPipeline) -> ProcessHandle:
        process = spawn(phase, loaded)
        if len(harness.spawned) == during:
            harness.supervisor.request_stop()
        return process

    harness.supervisor.seams = replace(harness.supervisor.seams, spawn=spawn_then_signal)
    harness.tick()

    assert len(harness.spawned) == during, "no worker starts once a stop was asked for"
    assert all(p.signals == ["terminate"] for p in harness.all_processes()), "every worker started is stopped"
    for p in harness.all_processes():
        p.exitcode = 0
    harness.tick()
    assert harness.supervisor.finished()


def test_a_second_stop_request_kills_and_its_jobs_go_back_unmarked(harness: Harness) -> None:
    harness.tick()

    harness.supervisor.request_stop()
    harness.supervisor.request_stop()

    assert all(p.signals == ["terminate", "kill"] for p in harness.all_processes())
    for p in harness.all_processes():
        p.exitcode = -9
    harness.tick()
    # recover() sees the supervisor cut them short: their jobs did not kill them
    assert {s.state for s in harness.recovered} == {SlotState.CUT_SHORT}
    assert harness.supervisor.finished()


def test_the_stop_deadline_kills_the_stragglers(harness: Harness) -> None:
    harness.tick()
    quick, *stragglers = harness.all_processes()
    deadline = max(EXTRACT_TIMEOUT_S, CHUNK_TIMEOUT_S)  # the default grace: the longest timeout

    harness.supervisor.request_stop()
    quick.exitcode = 0
    harness.clock.advance(deadline - 1)
    harness.tick()
    assert all(p.signals == ["terminate"] for p in harness.all_processes())

    harness.clock.advance(1)
    harness.tick()

    assert quick.signals == ["terminate"]
    assert all(p.signals == ["terminate", "kill"] for p in stragglers)

    harness.clock.advance(1)
    harness.tick()
    assert all(p.signals == ["terminate", "kill"] for p in stragglers), "killed once"

    for p in stragglers:
        p.exitcode = -9
    harness.tick()
    assert harness.supervisor.finished()
    assert [s.state for s in harness.recovered] == [SlotState.RETIRING] + [SlotState.CUT_SHORT] * 2


def test_grace_sets_how_long_a_stop_waits(harness: Harness) -> None:
    harness.supervisor.grace_s = 5
    harness.tick()

    harness.supervisor.request_stop()
    harness.clock.advance(4.9)
    harness.tick()
    assert all(p.signals == ["terminate"] for p in harness.all_processes())

    harness.clock.advance(0.1)
    harness.tick()
    assert all(p.signals == ["terminate", "kill"] for p in harness.all_processes())


def test_an_edit_seen_during_a_tick_is_applied_cleanly(tmp_path: Path) -> None:
    h = single_phase_harness(tmp_path)
    h.tick()

    def recover_and_reread(slot: Slot) -> list[str]:
        # the real recover seam (pool.make_supervisor) reads the pipeline; the user saved an edit just before
        h.edit(pipeline_text())
        h.supervisor.watcher.current()
        return []

    h.supervisor.seams.recover = recover_and_reread
    h.clock.advance(QUICK_CRASH_S + 1)
    h.running("extract")[0].exitcode = 1
    h.tick()
    h.tick()

    assert all(phase in loaded.spec.phases for phase, loaded, _ in h.spawned)
    assert len(h.running("chunk")) == 1


# --- the published report ------------------------------------------------------------------------


def test_a_changed_count_is_published_at_once_and_an_unchanged_one_at_most_each_second(
    tmp_path: Path, connection: redis.Redis
) -> None:
    """Status reads the published report beside RQ's live workers: a scale-down's retired worker
    leaves within a tick, so a count published a second late would show the phase short."""
    h = single_phase_harness(tmp_path, workers=3)
    reporter = Reporter(connection, h.supervisor)
    name = h.supervisor.watcher.current().spec.name

    def published() -> int:
        [report] = live_reports(connection, name)
        return report.phases["extract"].desired

    h.tick()
    reporter.publish()
    assert published() == 3

    h.edit(pipeline_text(extract_workers=1, with_chunk=False))
    h.tick()
    reporter.publish()
    assert published() == 1

    connection.delete(keys.supervisors(name))
    reporter.publish()
    assert live_reports(connection, name) == []  # nothing changed within the second: not written again
