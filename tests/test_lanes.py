"""Priority lanes: a worker takes the highest lane with jobs in one atomic step, a lower lane keeps
its minimum share, and a document keeps its lane through every phase, retries and requeues."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from levers import keys
from levers.documents.lanes import LaneQueue, phase_lanes
from levers.worker import lane_take
from levers.worker.lane_take import Took, group, take, take_any
from tests.conftest import StartLevers, doc_field, levers, make_project, stop, submit, wait_until

PIPELINE = "toy"
PHASE = "first"
# a storm kills at least this many busy workers, however quick the machine, polling this often
MIN_KILLS = 8
POLL_S = 0.1


def lanes_of(connection: redis.Redis) -> list[LaneQueue]:
    return phase_lanes(connection, PIPELINE, PHASE)


def fill(queue: Queue, count: int) -> list[str]:
    """``count`` job ids pushed onto ``queue`` as LaneQueue pushes them (the take reads ids only)."""
    ids = [f"{queue.name}-{i}" for i in range(count)]
    for job_id in ids:
        queue.push_job_id(job_id)
    return ids


def taken_lanes(connection: redis.Redis, share: float, count: int) -> list[str]:
    [served] = group(lanes_of(connection))
    found = []
    for _ in range(count):
        took = take(connection, served, share)
        assert took is not None
        found.append(keys.lane_of(took.queue.name)[1])
    return found


def test_the_highest_lane_with_jobs_goes_first_into_its_holding_list(connection: redis.Redis) -> None:
    high, normal, low = lanes_of(connection)
    fill(low, 2)
    fill(normal, 1)
    [served] = group([low, normal, high])  # listed in any order, taken highest first

    taken = [take(connection, served, 0.05) for _ in range(3)]

    assert [(t.queue.name, t.job_id, t.for_share) for t in taken if t] == [
        ("toy.first", "toy.first-0", False), ("toy.first:low", "toy.first:low-0", False),
        ("toy.first:low", "toy.first:low-1", False),
    ]  # fmt: skip
    # each job moved to its own lane's holding list, where the supervisor's look finds it
    assert normal.intermediate_queue.get_job_ids() == ["toy.first-0"]
    assert low.intermediate_queue.get_job_ids() == ["toy.first:low-0", "toy.first:low-1"]
    assert take(connection, served, 0.05) is None
    assert not connection.exists(keys.lane_wake("toy.first"))  # idle workers block until a push


@pytest.mark.parametrize("share", [0.05, 0.2])
def test_a_lower_lane_gets_its_minimum_share_while_it_has_work(connection: redis.Redis, share: float) -> None:
    high, normal, low = lanes_of(connection)
    fill(high, 1000)
    fill(normal, 1000)
    fill(low, 1000)

    counts = Counter(taken_lanes(connection, share, 600))

    # every lower lane gets its share of the dequeues, to within one, however busy the lanes above
    assert abs(counts["low"] - 600 * share) <= 1 and abs(counts["normal"] - 600 * share) <= 1
    assert counts["high"] == 600 - counts["low"] - counts["normal"]


def test_the_share_is_spread_out_and_no_lane_saves_credit_while_empty(connection: redis.Redis) -> None:
    high, _, low = lanes_of(connection)
    fill(high, 200)
    fill(low, 3)

    order = taken_lanes(connection, 0.05, 100)

    # one low job in every twenty dequeues, not a burst of them
    assert [i for i, lane in enumerate(order) if lane == "low"] == [19, 39, 59]
    # low emptied: its credit went with it, so new low work waits its turn again
    fill(low, 5)
    assert taken_lanes(connection, 0.05, 19) == ["high"] * 19


def test_no_share_is_strict_priority(connection: redis.Redis) -> None:
    high, _, low = lanes_of(connection)
    fill(high, 100)
    fill(low, 100)

    assert set(taken_lanes(connection, 0.0, 100)) == {"high"}


def test_an_idle_worker_wakes_when_a_job_enters_any_lane(
    connection: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lane_take, "LANE_LOOK_S", 600.0)  # only the wake can end the wait in time
    high, normal, low = lanes_of(connection)
    found: list[Took] = []
    own = redis.Redis.from_url(redis_url)  # the waiter's, blocked

    def wait() -> None:
        found.append(take_any(own, group([high, normal, low]), 0.05, 600))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    wait_until(lambda: any(c.get("cmd") == "blmove" for c in connection.client_list()))

    fill(low, 1)

    wait_until(lambda: found, timeout_s=30)
    assert [(t.queue.name, t.job_id) for t in found] == [("toy.first:low", "toy.first:low-0")]


def test_a_bad_priority_is_one_line_and_exit_2(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=1)

    result = levers("submit", "docs/doc0.txt", "--priority", "urgent", cwd=root)

    assert result.returncode == 2
    assert "urgent" in result.stderr and "high" in result.stderr and "Traceback" not in result.stderr
    assert connection.zcard("levers:toy:docs") == 0  # nothing submitted


def test_a_document_keeps_its_lane_through_every_phase_and_a_retry(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=1)
    (root / "docs" / "bad.txt").write_text("this one says FAIL")
    supervisor = start_levers("up", cwd=root)
    try:
        [good] = submit(root, "--priority", "high", "docs/doc0.txt")
        [bad] = submit(root, "--priority", "low", "docs/bad.txt")
        wait_until(lambda: doc_field(connection, good, "status") == "done")
        wait_until(lambda: doc_field(connection, bad, "status") == "failed")
    finally:
        stop(supervisor)

    # finished jobs are not kept: each phase's lanes count what workers took from them
    taken = {phase: connection.hgetall(f"levers:lanes:toy.{phase}") for phase in ("first", "second")}
    # the bad one twice: its attempt and RQ's retry (retries: 1), both in its own lane
    assert taken["first"] == {b"taken:high": b"1", b"taken:low": b"2"}, taken
    assert taken["second"][b"taken:high"] == b"1" and b"taken:normal" not in taken["second"], taken
    assert doc_field(connection, good, "priority") == "high"
    # a retry (RQ's, then `levers retry`) goes back into the document's own lane
    retried = levers("retry", bad, cwd=root)
    assert retried.returncode == 0, retried.stderr
    [job] = Queue("toy.first:low", connection=connection, serializer=JSONSerializer).get_jobs()
    assert job.args == ["first", bad]
    status = json.loads(levers("status", "--json", cwd=root).stdout)
    first = next(p for p in status["phases"] if p["phase"] == "first")
    assert first["queued"] == 1 and first["lanes"] == {"high": 0, "normal": 0, "low": 1}


def test_a_high_document_overtakes_a_thousand_queued_low_ones(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.02, docs=1000)
    (root / "urgent.txt").write_text("the urgent one")
    low = submit(root, "--priority", "low", "docs")
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        wait_until(lambda: connection.hget(keys.lane_state("toy.first"), "taken:low") is not None)
        [high] = submit(root, "--priority", "high", "urgent.txt")
        wait_until(lambda: doc_field(connection, high, "phase") == "second", timeout_s=60)
    finally:
        stop(supervisor)

    submitted, started = (float(doc_field(connection, high, f) or 0) for f in ("submitted", "first:started"))
    lows = [float(s) for s in started_at(connection, low) if s is not None]
    # between its submission and its start, the worker took at most the low job it took ahead
    # while running the one before (and one whose take was under way): not the queue's 1,000
    assert sum(submitted < s < started for s in lows) <= 2
    assert len(low) - sum(s < started for s in lows) >= 900


def started_at(connection: redis.Redis, doc_ids: list[str]) -> list[float | None]:
    with connection.pipeline() as pipe:
        for doc_id in doc_ids:
            pipe.hget(f"levers:toy:doc:{doc_id}", "first:started")
        return [float(s) if s else None for s in pipe.execute()]


def statuses(connection: redis.Redis, doc_ids: list[str]) -> list[str]:
    with connection.pipeline() as pipe:
        for doc_id in doc_ids:
            pipe.hget(f"levers:toy:doc:{doc_id}", "status")
        return [(s or b"").decode() for s in pipe.execute()]


def busy_workers(connection: redis.Redis, hit: set[str]) -> list[tuple[Worker, str]]:
    return [
        (w, job_id)
        for w in Worker.all(connection=connection)
        if w.get_state() == "busy" and (job_id := w.get_current_job_id()) is not None and job_id not in hit
    ]


STORM_PIPELINE = """
name: toy
phases:
  first:
    handler: toyphases:first
    accepts: [.txt]
    next: second
    retries: 20
    retry_delay: 0
    levers: {workers: 3}
    options: {seconds: 0.05}
  second:
    handler: toyphases:second
    retries: 20
    retry_delay: 0
    levers: {workers: 2}
"""


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_kill_9_storm_over_three_lanes_loses_no_job(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, docs=0)
    (root / "pipeline.yaml").write_text(STORM_PIPELINE)
    ids: dict[str, list[str]] = {}
    for lane in keys.LANES:
        (root / lane).mkdir()
        for i in range(40):
            (root / lane / f"{lane}{i}.txt").write_text(f"{lane} document {i} of the storm")
        ids[lane] = submit(root, "--priority", lane, lane)
    everything = [d for lane in keys.LANES for d in ids[lane]]
    pick = random.Random(5)
    hit: set[str] = set()
    kills = 0
    with (root / "up.log").open("a") as log:
        supervisor = start_levers("up", cwd=root, output=log)
        try:
            while kills < MIN_KILLS or set(statuses(connection, everything)) != {"done"}:
                candidates = busy_workers(connection, hit)
                if candidates:
                    worker, job_id = pick.choice(candidates)
                    hit.add(job_id)  # a job killed past its retries fails by design
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(worker.pid, signal.SIGKILL)
                        kills += 1
                time.sleep(POLL_S)
        finally:
            stop(supervisor)

    assert set(statuses(connection, everything)) == {"done"}
    for phase in ("first", "second"):
        for name in keys.lane_queues(PIPELINE, phase):
            queue = Queue(name, connection=connection)
            assert queue.count == 0 and queue.intermediate_queue.get_job_ids() == [], name
    assert {doc_field(connection, d, "priority") for d in ids["low"]} == {"low"}
