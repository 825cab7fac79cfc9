"""Stops and kills with real processes: platform stops (SIGTERM, then SIGKILL after a grace),
kill -9 of workers and supervisors, and `levers up --grace`. No job is lost or waits for RQ's
own abandoned-job pass, and a kill is not taken for a crash."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import redis
from rq import Queue, Worker
from rq.serializers import JSONSerializer

from levers.documents.ledger import Ledger
from levers.observing.reports import live_reports
from levers.worker.process import recover_jobs
from levers.worker.rq_worker import LeversWorker
from tests.conftest import (
    LEVERS,
    StartLevers,
    doc_field,
    free_port,
    kill,
    levers,
    make_project,
    stop,
    submit,
    try_scrape,
    wait_until,
)

# RQ ignores a second stop signal this soon after the first (a duplicate, to RQ)
RQ_DUPLICATE_SIGNAL_S = 1.0
# A platform's grace between its SIGTERM and its SIGKILL (honcho's is 5 s): the fault's timing,
# not a wait for something to happen
PLATFORM_GRACE_S = 2.0


def first_queue(connection: redis.Redis) -> Queue:
    return Queue("toy.first", connection=connection, serializer=JSONSerializer)


def only_worker(connection: redis.Redis) -> Worker:
    [worker] = Worker.all(queue=first_queue(connection))
    return worker


def deaths(queue: Queue, doc_id: str) -> int:
    """The worker-death mark of ``doc_id``'s job, waiting on ``queue``."""
    [job] = [j for j in queue.jobs if j.args[1] == doc_id]
    return int(job.meta.get("worker_deaths", 0))


def warm_stopping(connection: redis.Redis, worker: Worker, for_s: float = 0.0) -> bool:
    """The worker has received its first stop signal, at least ``for_s`` ago."""
    found = Worker.find_by_key(worker.key, connection=connection)
    requested = found.shutdown_requested_date if found is not None else None
    return requested is not None and time.time() - requested.timestamp() >= for_s


def test_sigterm_then_sigkill_of_the_supervisor_lets_the_running_job_finish(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=10, docs=1)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    [doc_id] = submit(root, "docs/doc0.txt")
    wait_until(lambda: doc_field(connection, doc_id, "status") == "running")
    worker = only_worker(connection)

    # what honcho does on Ctrl-C: SIGTERM, then SIGKILL a fixed time later (honcho's is 5 s)
    supervisor.send_signal(signal.SIGTERM)
    wait_until(lambda: warm_stopping(connection, worker))
    time.sleep(PLATFORM_GRACE_S)
    kill(supervisor)

    # the orphaned worker finishes the job and hands it off, far sooner than RQ's 10-minute pass
    wait_until(lambda: doc_field(connection, doc_id, "first:seconds") is not None, timeout_s=30)
    wait_until(lambda: _gone(worker.pid), timeout_s=15)
    assert doc_field(connection, doc_id, "first:attempts") == "1"
    assert Queue("toy.second", connection=connection).count == 1
    assert first_queue(connection).started_job_registry.count == 0


def test_a_cold_stop_of_an_orphaned_worker_puts_its_job_back_itself(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=30, docs=1)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    [doc_id] = submit(root, "docs/doc0.txt")
    wait_until(lambda: doc_field(connection, doc_id, "status") == "running")
    worker = only_worker(connection)
    kill(supervisor)  # no supervisor is left to requeue anything
    wait_until(lambda: warm_stopping(connection, worker, RQ_DUPLICATE_SIGNAL_S))

    os.kill(worker.pid, signal.SIGTERM)  # an operator's second signal: a cold stop

    wait_until(lambda: _gone(worker.pid), timeout_s=15)
    queue = first_queue(connection)
    assert [job.args[1] for job in queue.jobs] == [doc_id]
    assert queue.started_job_registry.count == 0
    assert doc_field(connection, doc_id, "status") == "queued"
    assert doc_field(connection, doc_id, "first:attempts") == "0"  # taken back: the job was cut short
    assert deaths(queue, doc_id) == 0


def test_a_job_still_running_when_the_grace_ends_goes_back_to_the_head_of_its_queue(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=30, docs=2)
    supervisor = start_levers("up", "--phase", "first", "--grace", "1", cwd=root)
    running, waiting = submit(root, "docs/doc0.txt", "docs/doc1.txt")
    wait_until(lambda: doc_field(connection, running, "status") == "running")

    output = stop(supervisor)

    assert supervisor.returncode == 0, output
    assert "grace is over" in output
    queue = first_queue(connection)
    assert [job.args[1] for job in queue.jobs] == [running, waiting]
    assert queue.started_job_registry.count == 0
    assert doc_field(connection, running, "status") == "queued"
    assert doc_field(connection, running, "first:attempts") == "0"
    assert deaths(queue, running) == 0


def test_workers_killed_after_doing_jobs_are_replaced_at_once_and_the_phase_never_backs_off(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.2, docs=80)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    kills = 6  # one more than the quick crashes that make a phase failing
    try:
        submit(root, "docs")
        killed: set[int] = set()
        states: set[str] = set()
        for _ in range(kills):
            wait_until(lambda: _a_new_worker_has_done_a_job(connection, killed))
            worker = only_worker(connection)
            os.kill(worker.pid, signal.SIGKILL)
            killed.add(worker.pid)
            states |= _phase_states(connection)
        wait_until(lambda: _a_new_worker_has_done_a_job(connection, killed))
        wait_until(lambda: _phase_restarts(connection) == kills)
        states |= _phase_states(connection)
    finally:
        output = stop(supervisor)
    assert states == {"ok"}, output
    assert output.count("exited with -9") == kills


def _a_new_worker_has_done_a_job(connection: redis.Redis, killed: set[int]) -> bool:
    workers = [w for w in Worker.all(queue=first_queue(connection)) if w.pid not in killed]
    return len(workers) == 1 and workers[0].successful_job_count > 0


def _phase_states(connection: redis.Redis) -> set[str]:
    return {r.phases["first"].state for r in live_reports(connection, "toy")}


def _phase_restarts(connection: redis.Redis) -> int:
    [report] = live_reports(connection, "toy")
    return report.phases["first"].restarts


def test_a_dead_workers_jobs_go_back_by_what_each_was_doing(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=3)
    running, ahead, handed_on = submit(root, "docs")
    queue = first_queue(connection)
    worker = LeversWorker([queue], connection=connection, name="first.host.1", serializer=JSONSerializer)
    worker.register_birth()
    ledger = Ledger(connection, "toy")
    jobs = {}
    for _ in range(3):  # what the worker did before it died: take each job and record its start
        found = Queue.dequeue_any([queue], None, connection=connection, serializer=JSONSerializer)
        assert found is not None
        job = found[0]
        worker.prepare_execution(job)
        worker.prepare_job_execution(job, remove_from_intermediate_queue=True)
        ledger.start(job.args[1], "first")
        jobs[job.args[1]] = job
    with connection.pipeline() as pipe:  # one job's hand-off went through before the death
        pipe.multi()
        ledger.finished(handed_on, "first", 0.1, 0, "second", pipe)
        pipe.execute()

    was_running = jobs[running].id
    recovered = recover_jobs(connection, "toy", worker.name, 1, struck=lambda job_id: job_id == was_running)

    assert sorted(recovered) == sorted([jobs[running].id, jobs[ahead].id])
    assert sorted(job.args[1] for job in queue.jobs) == sorted([running, ahead])
    assert queue.started_job_registry.count == 0
    # the job whose handler ran: a death mark, its attempt kept
    assert deaths(queue, running) == 1 and doc_field(connection, running, "first:attempts") == "1"
    # the one taken ahead: as if never taken
    assert deaths(queue, ahead) == 0 and doc_field(connection, ahead, "first:attempts") == "0"
    assert doc_field(connection, ahead, "status") == "queued"
    # the one handed on: finished, not run again, and gone as a finished job goes (no result kept)
    assert not connection.exists(jobs[handed_on].key)
    assert doc_field(connection, handed_on, "first:attempts") == "1"
    assert doc_field(connection, handed_on, "phase") == "second"


def test_the_metrics_exporter_dies_with_a_killed_supervisor(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=0)
    port = free_port()
    supervisor = start_levers("up", "--metrics-port", str(port), cwd=root)
    wait_until(lambda: try_scrape(port) is not None)
    wait_until(lambda: len(Worker.all(connection=connection)) == 2)
    # the exporter shares the supervisor's process group; workers (registered: started) lead their own
    group = os.getpgid(supervisor.pid)
    [exporter] = [p for p in psutil.Process(supervisor.pid).children() if os.getpgid(p.pid) == group]

    kill(supervisor)

    wait_until(lambda: _gone(exporter.pid))
    assert try_scrape(port) is None  # nothing serves stale figures there, or holds the port


def _gone(pid: int) -> bool:
    """Exited (a zombie too: an orphan's new parent may be slow to reap it)."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


def test_grace_must_be_a_number_of_seconds(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=0)
    for bad in ("-1", "soon"):
        result = levers("up", "--grace", bad, cwd=root)
        assert result.returncode == 2
        assert "--grace" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_a_stop_signal_to_the_process_group_while_workers_start_stops_them_all(
    tmp_path: Path, redis_url: str
) -> None:
    """What a terminal's Ctrl-C or systemd's stop does: the signal reaches the supervisor and every
    worker at once, here while the supervisor is still starting them. The stop must not wait for
    its grace (300 s) on a worker that missed it."""
    for attempt in range(3):
        (tmp_path / f"project{attempt}").mkdir()
        root = make_project(tmp_path / f"project{attempt}", workers=6, docs=0)
        up = subprocess.Popen(
            [*LEVERS, "up", "--grace", "300"], cwd=root, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            wait_until(lambda: psutil.Process(up.pid).children(), timeout_s=60, poll_s=0.005)  # noqa: B023
            os.killpg(up.pid, signal.SIGTERM)
            assert up.wait(timeout=90) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(up.pid, signal.SIGKILL)
            up.wait()
