"""Levers changed while the pipeline runs: `levers set` against a live supervisor."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import redis
from rq import Queue, Worker

from tests.conftest import StartLevers, doc_field, levers, make_project, stop, submit, wait_until


def first_workers(connection: redis.Redis) -> list[Worker]:
    return Worker.all(queue=Queue("toy.first", connection=connection))


def test_set_workers_rescales_a_running_supervisor(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1)
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: len(first_workers(connection)) == 1)

        grown = levers("set", "first.workers=3", cwd=root)
        assert grown.returncode == 0, grown.stderr
        assert "phases.first.levers.workers: 1 -> 3" in grown.stdout
        assert "applied by 1 supervisor(s)" in grown.stderr
        assert len(first_workers(connection)) == 3

        shrunk = levers("set", "first.workers=1", cwd=root)
        assert "applied by 1 supervisor(s)" in shrunk.stderr
        wait_until(lambda: len(first_workers(connection)) == 1)
    finally:
        stop(supervisor)
    assert supervisor.returncode == 0


def test_scaling_down_never_kills_a_running_job(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, seconds=2, docs=2)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        doc_ids = submit(root, "docs")
        wait_until(lambda: all(doc_field(connection, d, "status") == "running" for d in doc_ids))

        levers("set", "first.workers=0", cwd=root)

        wait_until(lambda: all(doc_field(connection, d, "first:seconds") for d in doc_ids))
        assert [doc_field(connection, d, "first:attempts") for d in doc_ids] == ["1", "1"]
        wait_until(lambda: first_workers(connection) == [])
    finally:
        stop(supervisor)


def test_semaphore_change_reaches_the_next_job_without_a_restart(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=2)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        [before] = submit(root, "docs/doc0.txt")
        wait_until(lambda: doc_field(connection, before, "first:seconds"))
        levers("set", "first.semaphore=7", cwd=root)
        [after] = submit(root, "docs/doc1.txt")
        wait_until(lambda: doc_field(connection, after, "first:seconds"))
    finally:
        stop(supervisor)
    outputs = [
        json.loads((root / ".levers/artifacts" / d / "first.json").read_text()) for d in (before, after)
    ]
    assert [o["semaphore"] for o in outputs] == [1, 7]
    assert outputs[0]["pid"] == outputs[1]["pid"]  # the same worker process served both


def test_an_invalid_edit_never_reaches_a_job(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=1)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        wait_until(lambda: len(first_workers(connection)) == 1)
        pipeline = root / "pipeline.yaml"
        good = pipeline.read_text()
        pipeline.write_text(good.replace("{workers: 1}", "{workers: -4}", 1))

        status = json.loads(levers("status", "--json", cwd=root).stdout)
        wait_until(lambda: json.loads(levers("status", "--json", cwd=root).stdout)["config_error"])
        [doc_id] = submit(root, "docs/doc0.txt")
        wait_until(lambda: doc_field(connection, doc_id, "first:seconds"))
        assert len(first_workers(connection)) == 1
        pipeline.write_text(good)
        wait_until(lambda: not json.loads(levers("status", "--json", cwd=root).stdout)["config_error"])
    finally:
        supervisor.send_signal(signal.SIGTERM)
        logged, _ = supervisor.communicate(timeout=60)
    assert status["phases"][0]["workers_alive"] == 1
    # the log says so too, where the error is, and when the file is valid again
    assert "the pipeline has an error; the workers keep the last good version: pipeline.yaml:" in logged
    assert "the pipeline is valid again" in logged
