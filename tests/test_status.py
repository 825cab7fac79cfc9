"""`levers status` figures from a real pipeline run: totals, recent pace, job times, waits."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

from tests.conftest import StartLevers, doc_field, levers, make_project, submit, wait_until


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


def test_status_answers_with_a_deep_queue_without_scanning(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)
    # a deep queue as RQ keeps it: job ids on a list; status must read its length, not its jobs
    connection.rpush("rq:queue:toy.first", *[f"job-{i}" for i in range(20_000)])

    status = json.loads(levers("status", "--json", cwd=root).stdout)

    first = phase(status, "first")
    assert first["queued"] == 20_000
    assert "queue over 1000: add workers now" in first["alerts"]


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
