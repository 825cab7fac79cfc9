"""Autoscaling, replayed: the reconcile loop on demand traces with a fake clock and fake workers.

A trace gives the jobs of a phase (queued + running) at every tick; the simulated workers run as
many of them as there are workers alive, oldest first, so a worker is busy exactly while it has a
job. The supervisor reads the demand through its ``observe`` seam and stops workers through
``terminate``: every stop of a busy worker is recorded, and a retiring worker exits on the next tick.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from pathlib import Path

import pytest

from levers.errors import SpecError
from levers.observing.reports import SupervisorReport
from levers.pipeline.editing import set_values
from levers.pipeline.loading import LoadedPipeline
from levers.pipeline.model import Autoscale
from levers.pipeline.watching import PipelineWatcher
from levers.supervisor.reconcile import Seams, Slot, SlotState, Supervisor
from levers.supervisor.scaling import Inputs, LimitUse, Load, Observed, Peer, Scaler, memory_cap, share
from tests.test_supervisor import FakeClock, FakeProcess

TICK_S = 0.25


def autoscaled_text(
    workers: int = 1, scale_down_after: float = 60, ram_mb: float | None = None, per_worker: int = 4
) -> str:
    resources = f"    resources: {{ram_mb: {ram_mb}}}\n" if ram_mb else ""
    return f"""\
phases:
  work:
    handler: json:dumps
    accepts: [txt]
    levers: {{workers: {workers}, semaphore: 5}}
    autoscale: {{min: 1, max: 8, per_worker: {per_worker}, scale_down_after: {scale_down_after}}}
{resources}limits:
  api: {{concurrency: 10}}
"""


class Replay:
    """A supervisor on fakes, fed a demand trace tick by tick."""

    def __init__(self, path: Path, peers: Callable[[], tuple[Peer, ...]] = tuple, me: str = "a:1") -> None:
        self.clock = FakeClock()
        self.jobs = 0  # queued + running now
        self.limits_used: frozenset[str] = frozenset()
        self.learned: dict[str, int] = {}  # limit -> concurrency learned from refusals
        self.free_mb: float | None = None
        self.peers = peers
        self.processes: list[FakeProcess] = []
        self.busy_stopped: list[int] = []  # pids of busy workers the supervisor stopped
        seams = Seams(spawn=self._spawn, recover=lambda slot: [], is_busy=self._is_busy,
                      observe=self._observe, clock=self.clock)  # fmt: skip
        self.supervisor = Supervisor(PipelineWatcher.open(path), seams, id=me)

    def _spawn(self, phase: str, loaded: LoadedPipeline) -> FakeProcess:
        process = FakeProcess(pid=100 + len(self.processes))
        self.processes.append(process)
        return process

    def alive(self) -> list[Slot]:
        return [s for s in self.supervisor.slots if s.process.exitcode is None]

    def running(self) -> int:
        """Workers counted as the phase's (not retiring)."""
        return sum(s.state is SlotState.RUNNING for s in self.alive())

    def busy(self) -> set[int]:
        """The workers with a job: as many as there are jobs, oldest workers first."""
        alive = sorted(self.alive(), key=lambda s: s.started_at)
        return {s.pid for s in alive[: self.jobs]}

    def _is_busy(self, slot: Slot) -> bool:
        return slot.pid in self.busy()

    def _observe(self, spec: object, phases: list[str]) -> Observed:
        running = min(self.jobs, len(self.alive()))
        load = Load(self.jobs - running, running)
        used, peers = {"work": self.limits_used}, {"work": self.peers()}
        return Observed({"work": load}, used, peers, self.free_mb, 4096, self.learned)

    def tick(self) -> None:
        busy = self.busy()
        before = {p.pid: len(p.signals) for p in self.processes}
        self.supervisor.tick()
        for process in self.processes:
            if len(process.signals) > before.get(process.pid, 0) and process.pid in busy:
                self.busy_stopped.append(process.pid)
        for slot in self.supervisor.slots:  # a retiring worker, idle, exits before the next tick
            if slot.state is SlotState.RETIRING and slot.process.exitcode is None:
                assert isinstance(slot.process, FakeProcess)
                slot.process.exitcode = 0
        self.clock.advance(TICK_S)

    def play(self, trace: Callable[[float], int], seconds: float) -> list[int]:
        """Tick through ``seconds`` of ``trace`` (jobs at a time since the start); the workers
        running after each tick."""
        start, counts = self.clock.now, []
        for _ in range(int(seconds / TICK_S)):
            self.jobs = trace(self.clock.now - start)
            self.tick()
            counts.append(self.running())
        return counts


def direction_changes(counts: list[int]) -> list[int]:
    """The indexes where the worker count turns from rising to falling or back."""
    turns, last = [], 0
    for index in range(1, len(counts)):
        step = counts[index] - counts[index - 1]
        if step and last and (step > 0) != (last > 0):
            turns.append(index)
        last = step or last
    return turns


@pytest.fixture
def pipeline_file(tmp_path: Path) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(autoscaled_text())
    return path


def test_a_burst_starts_the_first_extra_worker_within_one_tick(pipeline_file: Path) -> None:
    replay = Replay(pipeline_file)
    replay.play(lambda t: 0, 90)
    assert replay.running() == 1

    replay.jobs = 500
    replay.tick()

    assert replay.running() == 8  # ceil(500 / 4) = 125, up to max at once
    assert replay.supervisor.decisions["work"].reason == "demand 125 (500 jobs / 4 per worker); max 8"
    assert replay.busy_stopped == []


def test_a_burst_drains_on_max_workers_then_the_phase_is_back_to_min_one_window_later(
    pipeline_file: Path,
) -> None:
    replay = Replay(pipeline_file)
    replay.play(lambda t: 0, 10)
    left, emptied_at, counts = 500, None, []
    while replay.clock.now < 1400:
        replay.jobs = left
        replay.tick()
        counts.append(replay.running())
        left = max(0, left - round(replay.running() * 4 * TICK_S))  # 4 jobs a second per worker
        if left == 0 and emptied_at is None:
            emptied_at = replay.clock.now
    assert emptied_at is not None

    assert counts[0] == 8  # the tick that saw the burst
    back_at = replay.clock.now - TICK_S * (len(counts) - counts.index(1))
    assert back_at - emptied_at == pytest.approx(60, abs=2 * TICK_S)
    assert replay.busy_stopped == []


def test_the_count_returns_to_min_exactly_one_window_after_the_queue_empties(pipeline_file: Path) -> None:
    replay = Replay(pipeline_file)
    replay.play(lambda t: 100, 30)  # steady demand: 25 workers' worth, max 8
    assert replay.running() == 8

    counts = replay.play(lambda t: 0, 120)

    ticks_at_max = counts.index(1)
    # the highest recommendation over the last 60 s holds 8 until the window has passed, then at
    # once every idle worker stops (all are idle: the queue is empty)
    assert ticks_at_max * TICK_S == pytest.approx(60, abs=TICK_S)
    assert set(counts[ticks_at_max:]) == {1}
    assert replay.busy_stopped == []


def trickle(seed: int) -> Callable[[float], int]:
    """About 5 jobs at a time, +/-20 % at every tick: 4 to 6 workers' worth at one job per worker,
    so some workers are idle whenever the demand dips."""
    noise = random.Random(seed)
    return lambda t: round(5 * noise.uniform(0.8, 1.2))


@pytest.mark.parametrize("seed", [14, 15, 16])
def test_noisy_demand_changes_direction_at_most_once_per_ten_minutes(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(autoscaled_text(per_worker=1))
    replay = Replay(path)

    counts = replay.play(trickle(seed), 30 * 60)

    turns = direction_changes(counts)
    per_window = int(10 * 60 / TICK_S)
    assert all(len([t for t in turns if start <= t < start + per_window]) <= 1
               for start in range(0, len(counts), per_window // 10))  # fmt: skip
    assert replay.busy_stopped == []
    assert max(counts) == 6


def test_without_a_window_the_same_noise_flaps(tmp_path: Path) -> None:
    """The check above can fail: with scale_down_after 0 the count follows every swing."""
    path = tmp_path / "pipeline.yaml"
    path.write_text(autoscaled_text(scale_down_after=0, per_worker=1))
    replay = Replay(path)

    counts = replay.play(trickle(14), 10 * 60)

    assert len(direction_changes(counts)) > 10
    assert replay.busy_stopped == []


def test_a_scale_down_never_stops_a_busy_worker(pipeline_file: Path) -> None:
    replay = Replay(pipeline_file)
    replay.play(lambda t: 32, 10)
    assert replay.running() == 8

    # demand falls to 3 jobs, held by the three oldest workers; the window passes
    replay.play(lambda t: 3, 61)

    busy = replay.busy()
    assert replay.running() == 3  # desired is 1, but the three busy workers stay
    assert busy == {s.pid for s in replay.alive()}
    assert replay.busy_stopped == []
    replay.play(lambda t: 0, 1)  # they finish: now they go
    assert replay.running() == 1


def test_workers_is_the_starting_count(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(autoscaled_text(workers=4))
    replay = Replay(path)

    counts = replay.play(lambda t: 0, 70)

    assert counts[0] == 4  # held by the window, as if that many had been recommended at the start
    assert counts[-1] == 1


def test_the_shared_limit_caps_the_workers_and_says_so(pipeline_file: Path) -> None:
    replay = Replay(pipeline_file)
    replay.limits_used = frozenset({"api"})
    replay.jobs = 500
    replay.tick()

    # concurrency 10 / semaphore 5: 2 workers keep every slot busy
    assert replay.running() == 2
    assert "limit cap 2 (api: 10 at once / semaphore 5)" in replay.supervisor.decisions["work"].reason


def test_the_limit_cap_follows_the_concurrency_the_limit_learned(pipeline_file: Path) -> None:
    replay = Replay(pipeline_file)
    replay.limits_used = frozenset({"api"})
    replay.learned = {"api": 4}  # the provider refused beyond 4 calls at once, though 10 are declared
    replay.jobs = 500
    replay.tick()

    # 4 calls at once / semaphore 5: one worker already asks for more than the provider takes
    assert replay.running() == 1
    reason = replay.supervisor.decisions["work"].reason
    assert "limit cap 1 (api: 4 at once (learned) / semaphore 5)" in reason


def test_the_host_memory_caps_the_workers_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(autoscaled_text(ram_mb=300))
    replay = Replay(path)
    replay.tick()  # the starting worker
    replay.free_mb = 1000 + 0.1 * 4096  # 1,000 MB above the reserve: 3 more workers of 300 MB

    replay.jobs = 500
    replay.tick()

    assert replay.running() == 4  # the one running and 3 more
    report = replay.supervisor.report().phases["work"]
    assert report.desired == 4
    assert report.autoscale is not None and "memory cap 4" in report.autoscale.reason
    assert SupervisorReport.from_json(replay.supervisor.report().to_json()) is not None


def test_hosts_running_the_phase_share_the_demand(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(autoscaled_text())
    a = Replay(path, peers=lambda: (Peer("b:2", 8),), me="a:1")
    b = Replay(path, peers=lambda: (Peer("a:1", 8),), me="b:2")
    for replay in (a, b):
        replay.jobs = 40  # 10 workers' worth over both
        replay.tick()

    assert (a.running(), b.running()) == (5, 5)  # not 8 + 8


def test_share_fills_the_hosts_with_room_first() -> None:
    peers = (Peer("b", 2), Peer("c", 8))
    parts = [share(12, "a", 8, peers), share(12, "b", 2, (Peer("a", 8), Peer("c", 8))),
             share(12, "c", 8, (Peer("a", 8), Peer("b", 2)))]  # fmt: skip
    assert parts == [5, 2, 5]
    assert share(30, "a", 8, peers) == 8


def test_scaler_window_keeps_the_highest_recommendation() -> None:
    settings = Autoscale(min=0, max=10, per_worker=1, scale_down_after=10)
    scaler = Scaler(started_at=0, start_count=0)

    def at(now: float, jobs: int) -> int:
        return scaler.decide(settings, "a", Inputs(Load(jobs, 0)), now).desired

    assert at(0, 7) == 7
    assert at(5, 2) == 7
    assert at(9.9, 4) == 7
    assert at(10.1, 3) == 4  # 7 left the window; 4 at 9.9 is the highest left
    assert at(20.0, 0) == 3
    assert at(20.2, 0) == 0


def test_memory_cap_counts_the_workers_running() -> None:
    assert memory_cap(current=2, free_mb=1500, total_mb=5000, ram_mb=250) == 2 + 4
    assert memory_cap(current=2, free_mb=100, total_mb=5000, ram_mb=250) == 2
    assert memory_cap(current=2, free_mb=100, total_mb=5000, ram_mb=None) is None
    assert LimitUse("api", 15).workers(semaphore=10) == math.ceil(15 / 10)


def test_levers_set_reaches_every_autoscale_field(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text("phases:\n  work:\n    handler: json:dumps\n    accepts: [txt]\n")

    loaded, _ = set_values(path, ["work.autoscale.max=6", "work.autoscale.per_worker=3"])
    assert loaded.spec.phases["work"].autoscale == Autoscale(max=6, per_worker=3)
    loaded, _ = set_values(path, ["work.autoscale.min=2", "work.autoscale.scale_down_after=90"])
    assert loaded.spec.phases["work"].autoscale == Autoscale(min=2, max=6, per_worker=3, scale_down_after=90)

    before = path.read_bytes()
    with pytest.raises(SpecError) as raised:
        set_values(path, ["work.autoscale.min=7"])
    assert "min 7 is above max 6" in str(raised.value)
    assert path.read_bytes() == before
