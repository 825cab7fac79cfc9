"""`levers status` figures from a real pipeline run: totals, recent pace, job times, waits."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections import namedtuple
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.executions import prepare_execution
from rq.job import Job

from levers import keys
from levers.observing import status as status_module
from levers.observing.status import PhaseStatus, pipeline_status
from levers.pipeline.loading import load_pipeline
from levers.supervisor import usage
from tests.conftest import LEVERS, StartLevers, doc_field, levers, make_project, stop, submit, wait_until

CpuTimes = namedtuple("CpuTimes", "user idle iowait")


def phase(status: dict[str, object], name: str) -> dict[str, object]:
    return next(p for p in status["phases"] if p["phase"] == name)  # type: ignore[attr-defined]


@pytest.mark.e2e
def test_status_after_a_run_and_with_a_backlog(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.05, docs=3)
    assert levers("run", "docs", cwd=root).returncode == 0
    (root / "docs" / "late.txt").write_text("submitted while no worker runs")
    submitted = time.time()
    assert levers("submit", "docs/late.txt", cwd=root).returncode == 0

    status = json.loads(levers("status", "--json", cwd=root).stdout)
    since_submitted = time.time() - submitted
    table = levers("status", cwd=root)

    first = phase(status, "first")
    assert (first["done"], first["queued"], first["workers_alive"]) == (3, 1, 0)
    assert first["throughput"] > 0
    assert first["p50_s"] > 0.05  # the handler sleeps 0.05 s
    # the late document's age: waiting since its submission, and `levers status` started after it
    assert 0 < first["oldest_wait_s"] <= since_submitted
    assert "no worker alive" in first["alerts"]
    assert status["supervisors"] == []  # `levers run` gave its lease up when it stopped
    assert table.returncode == 0
    assert "no supervisor is running" in table.stdout


def test_a_queue_that_no_worker_is_declared_for_is_an_alert(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, workers=0, docs=2)
    submit(root, "docs")

    first = phase(json.loads(levers("status", "--json", cwd=root).stdout), "first")

    assert "2 queued and workers is 0: nothing takes them" in first["alerts"]  # type: ignore[operator]


def test_status_answers_with_a_deep_queue_without_scanning(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)
    # a deep queue as RQ keeps it: job ids on a list; status must read its length, not its jobs
    connection.rpush("rq:queue:toy.first", *[f"job-{i}" for i in range(20_000)])

    status = json.loads(levers("status", "--json", cwd=root).stdout)

    first = phase(status, "first")
    assert first["queued"] == 20_000
    assert "queue over 1000: add workers now" in first["alerts"]


def test_what_anyone_wrote_into_rqs_keys_does_not_break_status(
    tmp_path: Path, connection: redis.Redis
) -> None:
    root = make_project(tmp_path, docs=0)
    connection.zadd("rq:wip:toy.first", {"a:b:c": 1, b"\xff\xfe": 2, "no-execution": 3})
    connection.rpush("rq:queue:toy.first:high", "../../not a job")
    connection.hset("rq:job:../../not a job", mapping={"enqueued_at": "yesterday", "data": "{"})

    shown = levers("status", "--json", cwd=root)

    assert shown.returncode == 0, shown.stderr
    first = phase(json.loads(shown.stdout), "first")
    assert (first["queued"], first["running"], first["stranded"]) == (1, 0, 3)


CAPPED = """
name: capped
phases:
  work:
    handler: json:dumps
    accepts: [.txt]
    levers: {workers: 1, semaphore: 5}
    autoscale: {min: 1, max: 8, per_worker: 4}
limits:
  api: {concurrency: 12}
"""


def test_the_autoscale_need_is_capped_by_the_limits_the_phase_calls(
    tmp_path: Path, connection: redis.Redis
) -> None:
    (tmp_path / "pipeline.yaml").write_text(CAPPED)
    spec = load_pipeline(tmp_path / "pipeline.yaml").outline
    queue, used = f"rq:queue:{keys.queue_name('capped', 'work')}", keys.phase_limits("capped", "work")
    learned = keys.limit_adaptive("capped", "api")

    def needed() -> int:
        [work] = pipeline_status(connection, spec).phases
        assert work.autoscale is not None
        return work.autoscale.needed

    try:
        connection.rpush(queue, *[f"job-{i}" for i in range(40)])
        assert needed() == 10  # 40 jobs, 4 per worker
        connection.sadd(used, "api")  # its jobs call the limit: 12 at once, 5 per worker
        assert needed() == 3
        connection.hset(learned, "concurrency", 4)  # the provider allows fewer than declared
        assert needed() == 1
    finally:
        connection.delete(queue, used, learned)


@pytest.mark.e2e
def test_plan_uses_job_times_measured_by_the_workers(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.05, docs=2)
    assert levers("run", "docs", cwd=root).returncode == 0

    measured = json.loads(levers("plan", "--json", cwd=root).stdout)
    declared = json.loads(levers("plan", "--json", "--no-measured", cwd=root).stdout)

    first = next(p for p in measured["plan"]["phases"] if p["phase"] == "first")
    assert first["source"] == "measured"
    assert 0.05 <= first["job_seconds"] < 1
    assert first["docs_per_second"] == pytest.approx(1 / first["job_seconds"])
    assert {p["source"] for p in declared["plan"]["phases"]} == {"unknown"}


@pytest.mark.e2e
def test_reused_results_are_counted_apart_and_plan_measures_only_the_jobs_that_ran(
    tmp_path: Path, redis_url: str
) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.05, docs=2)
    assert levers("run", "docs", cwd=root).returncode == 0
    rerun = levers("run", "docs", "--force", cwd=root)  # the same content, code and settings
    assert rerun.returncode == 0, rerun.stderr

    status = json.loads(levers("status", "--json", cwd=root).stdout)
    measured = json.loads(levers("plan", "--json", cwd=root).stdout)

    counts = [(phase(status, p)["done"], phase(status, p)["reused"]) for p in ("first", "second")]
    assert counts == [(2, 2), (2, 2)]
    assert measured["window"]["jobs"] == {"first": 2, "second": 2}
    first = next(p for p in measured["plan"]["phases"] if p["phase"] == "first")
    assert first["job_seconds"] >= 0.05  # the handler sleeps 0.05 s: no reused result's 0 s in the mean
    assert "reused" in rerun.stdout


def test_a_dead_workers_job_is_stranded_not_running(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=60, docs=1)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        [doc_id] = submit(root, "docs/doc0.txt")
        wait_until(lambda: doc_field(connection, doc_id, "status") == "running")
        [worker] = Worker.all(queue=Queue("toy.first", connection=connection))
    finally:
        # the host goes: the supervisor and its worker die at once, and nobody puts the job back
        supervisor.kill()
        os.killpg(worker.pid, signal.SIGKILL)
        supervisor.communicate(timeout=10)

    def first() -> dict[str, object]:
        return phase(json.loads(levers("status", "--json", cwd=root).stdout), "first")

    wait_until(lambda: first()["stranded"] == 1)
    figures = first()
    assert (figures["running"], figures["workers_alive"], figures["workers_busy"]) == (0, 0, 0)
    assert "1 stranded: held by workers that are gone, until requeued" in figures["alerts"]  # type: ignore[operator]
    assert "stranded" in levers("status", cwd=root).stdout


def read_status(root: Path, connection: redis.Redis) -> dict[str, PhaseStatus]:
    outline = load_pipeline(root / "pipeline.yaml").outline
    return {p.phase: p for p in pipeline_status(connection, outline).phases}


def test_running_counts_what_runs_and_claimed_ahead_is_its_own(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, seconds=0.3, docs=40)
    submit(root, "docs")
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    seen = []
    try:
        while (figures := read_status(root, connection)["first"]).done < 40:
            seen.append(figures)
    finally:
        stop(supervisor)
    # a worker runs one job at a time, and takes its next one while finishing the one before
    assert max(f.running for f in seen) == 2
    assert all(f.running <= max(f.workers_alive, 2) for f in seen)
    assert any(f.claimed_ahead for f in seen)
    assert all(f.running + f.claimed_ahead <= 2 * 2 for f in seen)


def test_utilization_agrees_with_busy_workers_during_a_burst(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, seconds=30, docs=2)
    supervisor = start_levers("up", "--phase", "first", "--grace", "0", cwd=root)
    try:
        wait_until(lambda: read_status(root, connection)["first"].workers_alive == 2)
        submit(root, "docs")
        wait_until(lambda: read_status(root, connection)["first"].workers_busy == 2)
        # both workers busy for seconds, none of their jobs finished: most of their time was busy
        wait_until(lambda: read_status(root, connection)["first"].utilization >= 0.5, timeout_s=20)
        assert read_status(root, connection)["first"].done == 0
    finally:
        stop(supervisor)


def test_utilization_after_a_scale_down_counts_the_stopped_workers_time(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=4, seconds=1, docs=12)
    supervisor = start_levers("up", "--phase", "first", "--grace", "0", cwd=root)
    try:
        wait_until(lambda: read_status(root, connection)["first"].workers_alive == 4)
        submit(root, "docs")
        wait_until(lambda: read_status(root, connection)["first"].done == 12, timeout_s=60)
        assert levers("set", "first.workers=1", cwd=root).returncode == 0
        wait_until(lambda: read_status(root, connection)["first"].workers_alive == 1)

        # 12 busy seconds from four workers over their time alive: far from all of the one left's
        first = read_status(root, connection)["first"]
        assert first.done == 12
        assert 0 < first.utilization < 0.8
    finally:
        stop(supervisor)


def test_watch_shows_an_edit_at_its_next_refresh(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=0)
    # a pipeline of its own: the server is the session's, where other tests published theirs
    spec = root / "pipeline.yaml"
    spec.write_text(spec.read_text().replace("name: toy", "name: watched", 1))
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = {**os.environ, "COLUMNS": "250", "LINES": "50"}
    watch = subprocess.Popen(
        [*LEVERS, "status", "--watch"], cwd=root, env=env, stdout=follower, stderr=follower
    )
    os.close(follower)
    screen = bytearray()

    def first_row() -> list[str]:
        while select.select([leader], [], [], 0.1)[0]:
            try:
                screen.extend(os.read(leader, 65536))
            except OSError:
                break
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))
        rows = [line for line in text.splitlines() if line.startswith("│ first")]
        return [cell.strip() for cell in rows[-1].split("│")] if rows else []

    try:
        # workers: alive/desired, from the file when none runs (a first screen on a loaded machine
        # waits for the process's start)
        wait_until(lambda: "0/2" in first_row(), timeout_s=60)
        before = first_row()
        sem = before.index("1")
        assert levers("set", "first.semaphore=12", "first.workers=5", cwd=root).returncode == 0
        wait_until(lambda: (row := first_row()) and row[sem] == "12" and "0/5" in row, timeout_s=60)
        assert "12" not in before
    finally:
        watch.send_signal(signal.SIGINT)
        try:
            watch.wait(timeout=30)
        except subprocess.TimeoutExpired:
            watch.kill()  # nothing left running, whatever the test found
            watch.wait()
            raise AssertionError("levers status --watch did not stop on Ctrl-C within 30 s") from None
        finally:
            os.close(leader)


def test_host_cpu_is_measured_over_the_last_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    # seconds all cores spent (busy, idle) at 0, 30, 60, 90 and 120 s: half busy, then fully busy
    readings = [(0, 0), (30, 30), (60, 60), (120, 60), (180, 60)]
    monkeypatch.setattr(usage.psutil, "cpu_times", lambda: CpuTimes(*readings.pop(0), iowait=0))
    monkeypatch.setattr(usage.psutil, "cpu_count", lambda: 2)
    host = usage.HostCpu()
    # the supervisor's own processes: no CPU for a minute, then a whole core
    own = {0: 0.0, 30: 0.0, 60: 0.0, 90: 30.0, 120: 60.0}
    measured = [host.measure(float(t), own[t]) for t in (0, 30, 60, 90, 120)]
    # the first reading has nothing to compare with; then the last minute's share of busy time
    assert [m.percent if m else None for m in measured] == [None, 50.0, 50.0, 75.0, 100.0]
    assert [(m.busy_cores, m.own_cores) for m in measured if m] == [(1, 0), (1, 0), (1.5, 0.5), (2, 1)]


def test_a_job_taken_by_a_worker_that_started_during_the_read_is_not_stranded(
    tmp_path: Path, connection: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers are read before the jobs they hold: one that starts in between (a scale-up) and
    takes a job at once must not show as a gone worker's stranded job."""
    root = make_project(tmp_path, docs=0)
    queue = Queue("toy.first", connection=connection)
    read_lanes = status_module._read_lanes

    def a_worker_starts_meanwhile(*args: object) -> object:
        if connection.exists("rq:worker:latecomer"):  # the next phase's read
            return read_lanes(*args)
        latecomer = Worker([queue], connection=connection, name="latecomer")
        latecomer.register_birth()
        job = Job.create("json.dumps", args=(1,), connection=connection, origin=queue.name, id="taken")
        job.save()
        prepare_execution(latecomer, job)
        return read_lanes(*args)

    monkeypatch.setattr(status_module, "_read_lanes", a_worker_starts_meanwhile)
    first = read_status(root, connection)["first"]

    assert (first.running, first.stranded, first.workers_alive) == (1, 0, 1)
