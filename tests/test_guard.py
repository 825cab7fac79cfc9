"""Workers run levers' own jobs only: a job pushed by hand onto a phase's queue runs nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Callback, Queue, Worker
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import DefaultSerializer, JSONSerializer
from rq.webhook import Webhook

from levers.pipeline.loading import load_pipeline
from levers.worker.guard import GuardedJob, refusal
from levers.worker.rq_worker import LeversWorker
from tests.conftest import StartLevers, doc_field, make_project, stop, submit, wait_until

RUN_PHASE = "levers.worker.jobs.run_phase"
A_DOC_ID = "0123456789abcdef0123"

# A module that leaves a mark when it is imported, and a function that leaves one when called.
HOSTILE_MODULE = """
from pathlib import Path
Path(__file__).with_name("IMPORTED").touch()

def run(*args, **kwargs):
    Path(__file__).with_name("RAN").touch()
"""


class Unpickled:
    """Unpickling one creates ``path``: a pickle a worker must never load."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (str(self.path),))


def hostile_jobs(connection: redis.Redis, root: Path, queue_name: str) -> dict[str, str]:
    """Push every kind of foreign job onto ``queue_name``; job id -> the refusal expected."""
    (root / "hostile.py").write_text(HOSTILE_MODULE)
    as_json = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    as_pickle = Queue(queue_name, connection=connection, serializer=DefaultSerializer)
    phase = queue_name.split(".", 1)[1]
    jobs = {
        as_json.enqueue_call("os.makedirs", args=(str(root / "made-by-json"),)).id: "it names 'os.makedirs'",
        as_json.enqueue_call("hostile.run").id: "it names 'hostile.run'",
        as_pickle.enqueue_call(
            "os.makedirs", args=(str(root / "made-by-pickle"), Unpickled(root / "unpickled-args")),
            meta={"x": Unpickled(root / "unpickled-meta")},
        ).id: "its payload is not JSON",
        as_json.enqueue_call(RUN_PHASE, args=(phase, A_DOC_ID), kwargs={"x": 1}).id: "not (phase, document",
        as_json.enqueue_call(RUN_PHASE, args=("second", A_DOC_ID)).id: f"is not the phase of {queue_name}",
        as_json.enqueue_call(RUN_PHASE, args=(phase, "../../etc")).id: "is not a document id",
        as_json.enqueue_call(
            RUN_PHASE, args=(phase, A_DOC_ID), on_failure=Callback("hostile.run")
        ).id: "it names callbacks ('hostile.run')",
        as_json.enqueue_call(
            RUN_PHASE, args=(phase, A_DOC_ID), webhooks=[Webhook("http://127.0.0.1:9/", "failed")]
        ).id: "it names webhooks",
    }  # fmt: skip
    # a job hash written by hand that RQ cannot read back
    connection.hset("rq:job:handmade", mapping={
        "data": zlib.compress(b'["os.makedirs", null, ["/tmp/x"], {}]'), "origin": queue_name,
        "created_at": "not a date", "status": "queued",
    })  # fmt: skip
    connection.rpush(f"rq:queue:{queue_name}", "handmade")
    jobs["handmade"] = "its fields cannot be read"
    return jobs


def nothing_ran(root: Path) -> list[str]:
    marks = ["made-by-json", "made-by-pickle", "unpickled-args", "unpickled-meta", "IMPORTED", "RAN"]
    return [mark for mark in marks if (root / mark).exists()]


def refusals(connection: redis.Redis, queue_name: str) -> dict[str, str]:
    """The failed registry of ``queue_name``: job id -> the reason of its latest result."""
    queue = Queue(queue_name, connection=connection, serializer=JSONSerializer)
    found = {}
    for job_id in FailedJobRegistry(queue=queue).get_job_ids():
        result = Job(job_id, connection=connection, serializer=JSONSerializer).latest_result()
        found[job_id] = result.exc_string if result is not None else ""
    return found


def assert_refused(found: dict[str, str], expected: dict[str, str], log: str) -> None:
    assert set(found) == set(expected)
    for job_id, reason in expected.items():
        assert found[job_id].startswith("refused by levers: ") and reason in found[job_id], found[job_id]
        [line] = [line for line in log.splitlines() if f"refused job {job_id} " in line]
        assert reason in line


def test_levers_up_refuses_foreign_jobs_and_keeps_running_documents(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, docs=2)
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: len(Worker.all(connection=connection)) == 2)
        pids = sorted(w.pid for w in Worker.all(connection=connection))
        expected = hostile_jobs(connection, root, "toy.first")
        doc_ids = submit(root, "docs")

        wait_until(lambda: len(refusals(connection, "toy.first")) == len(expected))
        wait_until(lambda: all(doc_field(connection, d, "status") == "done" for d in doc_ids))
        assert sorted(w.pid for w in Worker.all(connection=connection)) == pids  # none died or restarted
    finally:
        output = stop(supervisor)
    assert nothing_ran(root) == []
    assert_refused(refusals(connection, "toy.first"), expected, output)
    assert "Traceback" not in output


def test_rq_worker_with_levers_worker_class_refuses_them_too(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, workers=1, docs=1)
    expected = hostile_jobs(connection, root, "toy.first")
    [doc_id] = submit(root, "docs")
    url = os.environ["REDIS_URL"]

    # `rq worker` hands its worker class RQ's pickle serializer unless told otherwise
    worker = subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--url", url, "--burst",
         "-w", "levers.worker.rq_worker.LeversWorker", "toy.first"],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert worker.returncode == 0, worker.stderr
    assert nothing_ran(root) == []
    assert_refused(refusals(connection, "toy.first"), expected, worker.stdout + worker.stderr)
    assert doc_field(connection, doc_id, "first:seconds") is not None


def test_registry_cleanup_resolves_no_callback_of_an_abandoned_job(
    tmp_path: Path, connection: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hostile.py").write_text(HOSTILE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    queue = Queue("toy.first", connection=connection, serializer=JSONSerializer)
    job = queue.enqueue_call("hostile.run", on_failure=Callback("hostile.run"))
    # written as if a worker had died running it long ago: RQ's cleanup runs its failure callback
    job.set_status(JobStatus.STARTED)
    connection.zadd(StartedJobRegistry(queue=queue).key, {f"{job.id}:gone": time.time() - 3600})

    LeversWorker(["toy.first"], connection=connection).clean_registries()

    assert nothing_ran(tmp_path) == []
    assert job.get_status(refresh=True) == JobStatus.FAILED  # the cleanup itself went on


def test_the_worker_reads_json_whatever_it_is_given(connection: redis.Redis) -> None:
    queue = Queue("toy.first", connection=connection, serializer=DefaultSerializer)

    worker = LeversWorker([queue], serializer="pickle", job_class=Job)

    assert worker.connection is not None
    assert worker.serializer is JSONSerializer and worker.job_class is GuardedJob
    # a phase's queue stands for its three lanes
    assert [q.name for q in worker.queues] == ["toy.first:high", "toy.first", "toy.first:low"]
    assert {(q.serializer, q.job_class) for q in worker.queues} == {(JSONSerializer, GuardedJob)}


@pytest.mark.parametrize("func_name", ["hostile.run", "os.makedirs"])
def test_a_guarded_job_resolves_no_other_function(
    func_name: str, connection: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hostile.py").write_text(HOSTILE_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    job = GuardedJob.create(func_name, connection=connection, serializer=JSONSerializer)

    with pytest.raises(Exception, match="is not levers' job function"):
        job.perform()
    assert nothing_ran(tmp_path) == []


def test_levers_own_job_passes(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)
    spec = load_pipeline(root / "pipeline.yaml").spec
    job = Queue("toy.first", connection=connection, serializer=JSONSerializer).enqueue_call(
        RUN_PHASE, args=("first", A_DOC_ID)
    )
    fetched = GuardedJob.fetch(job.id, connection=connection, serializer=JSONSerializer)

    assert refusal(fetched, "toy.first", spec) is None
    assert refusal(fetched, "toy.second", spec) == "its phase 'first' is not the phase of toy.second"
