"""The job's steps against a real server: an attempt hands a document on only while it is current."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from rq import Queue

from levers import metrics
from levers.documents.ledger import Ledger, Superseded
from levers.documents.store import LocalStore
from levers.documents.submission import Submitter
from levers.pipeline.loading import load_pipeline
from levers.pipeline.watching import PipelineWatcher
from levers.worker.jobs import complete_phase, perform_phase, record_failure, start_phase
from levers.worker.runtime import WorkerRuntime
from tests.conftest import doc_field, make_project


def submitted(root: Path, connection: redis.Redis) -> tuple[WorkerRuntime, str]:
    """A worker's runtime for the toy project, and the id of its one document, queued for ``first``."""
    make_project(root, docs=1)
    [outcome] = Submitter(load_pipeline(root / "pipeline.yaml"), connection).submit_paths(
        [str(root / "docs")]
    )
    Queue("toy.first", connection=connection).empty()  # the test plays the workers' part itself
    runtime = WorkerRuntime(PipelineWatcher.open(root / "pipeline.yaml"), connection, "redis://unused")
    assert outcome.doc_id is not None
    return runtime, outcome.doc_id


def test_a_worker_that_completes_after_its_job_was_taken_over_hands_nothing_off(
    tmp_path: Path, connection: redis.Redis
) -> None:
    runtime, doc = submitted(tmp_path, connection)
    cut_off = perform_phase(runtime, start_phase(runtime, "first", doc))
    # its host was thought lost: the job went back to its queue, and another worker took it
    assert Ledger(connection, "toy").host_lost(doc, "first", "host h1 lost")
    elsewhere = start_phase(runtime, "first", doc)

    with pytest.raises(Superseded):
        complete_phase(runtime, cut_off)

    second = Queue("toy.second", connection=connection)
    assert second.count == 0
    assert not LocalStore(tmp_path / ".levers/artifacts").has_output(doc, "first")
    complete_phase(runtime, perform_phase(runtime, elsewhere))
    assert second.count == 1
    assert Ledger(connection, "toy").totals("first") == {"done": 1, "retried": 1}
    assert doc_field(connection, doc, "first:lost") == "host h1 lost"
    # and once the document has moved on, the late one still hands nothing off
    with pytest.raises(Superseded):
        complete_phase(runtime, cut_off)
    assert second.count == 1


def test_a_superseded_attempt_that_fails_records_nothing(tmp_path: Path, connection: redis.Redis) -> None:
    runtime, doc = submitted(tmp_path, connection)
    cut_off = start_phase(runtime, "first", doc)
    Ledger(connection, "toy").host_lost(doc, "first", "host h1 lost")
    start_phase(runtime, "first", doc)

    assert not record_failure(runtime, cut_off, ValueError("late"), final=True, seconds=1.0)

    assert doc_field(connection, doc, "status") == "running"  # the attempt now running is untouched
    assert doc_field(connection, doc, "error") is None


def test_a_copy_of_a_job_that_ran_already_does_not_run(tmp_path: Path, connection: redis.Redis) -> None:
    runtime, doc = submitted(tmp_path, connection)
    complete_phase(runtime, perform_phase(runtime, start_phase(runtime, "first", doc)))

    with pytest.raises(Superseded):
        start_phase(runtime, "first", doc)

    assert doc_field(connection, doc, "first:attempts") == "1"
    assert doc_field(connection, doc, "phase") == "second"


def test_a_lost_host_leaves_a_document_it_already_handed_on_alone(
    tmp_path: Path, connection: redis.Redis
) -> None:
    runtime, doc = submitted(tmp_path, connection)
    complete_phase(runtime, perform_phase(runtime, start_phase(runtime, "first", doc)))

    assert not Ledger(connection, "toy").host_lost(doc, "first", "host h1 lost")

    assert doc_field(connection, doc, "status") == "queued"
    assert doc_field(connection, doc, "first:lost") is None


def test_a_failed_documents_job_requeued_by_hand_runs_again(tmp_path: Path, connection: redis.Redis) -> None:
    runtime, doc = submitted(tmp_path, connection)
    record_failure(runtime, start_phase(runtime, "first", doc), ValueError("flaky"), final=True, seconds=0.1)
    assert doc_field(connection, doc, "status") == "failed"

    complete_phase(runtime, perform_phase(runtime, start_phase(runtime, "first", doc)))

    assert doc_field(connection, doc, "first:attempts") == "2"
    assert doc_field(connection, doc, "phase") == "second"


def test_rq_worker_runs_levers_jobs_through_run_phase(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=2)
    (root / "docs" / "bad.txt").write_text("FAIL on purpose")
    doc_ids = Submitter(load_pipeline(root / "pipeline.yaml"), connection).submit_paths([str(root / "docs")])
    good = [o.doc_id for o in doc_ids if not o.source.endswith("bad.txt")]
    [bad] = [o.doc_id for o in doc_ids if o.source.endswith("bad.txt")]

    # RQ's own worker class: it calls levers.worker.jobs.run_phase, as it would any job function
    worker = subprocess.run(
        [sys.executable, "-m", "rq.cli", "worker", "--url", os.environ["REDIS_URL"], "--burst",
         "-w", "rq.SimpleWorker", "--serializer", "rq.serializers.JSONSerializer", "toy.first"],
        cwd=root, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert worker.returncode == 0, worker.stderr
    assert [doc_field(connection, d, "phase") for d in good] == ["second", "second"]
    assert Queue("toy.second", connection=connection).count == 2
    # the bad one failed, was retried once (retries: 1), then failed for good
    assert doc_field(connection, bad, "status") == "failed"
    assert doc_field(connection, bad, "first:attempts") == "2"
    figures = metrics.read(connection, "toy", "first")
    assert (figures.done, figures.retried, figures.failed) == (2, 1, 1)


BURNING_PHASE = """
import threading
import time

def burn(seconds):
    until = time.process_time() + seconds
    while time.process_time() < until:
        pass

def first(doc, ctx):
    helper = threading.Thread(target=burn, args=(0.15,))  # a handler's own thread counts too
    helper.start()
    time.sleep(0.3)  # waiting costs no CPU
    helper.join()
    return {"text": "burnt"}
"""


def test_a_job_records_the_cpu_its_worker_process_spent_on_it(
    tmp_path: Path, connection: redis.Redis
) -> None:
    make_project(tmp_path, docs=1)
    (tmp_path / "burnphases.py").write_text(BURNING_PHASE)
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(spec.read_text().replace("toyphases:first", "burnphases:first"))
    [outcome] = Submitter(load_pipeline(spec), connection).submit_paths([str(tmp_path / "docs")])
    runtime = WorkerRuntime(PipelineWatcher.open(spec), connection, "redis://unused")
    doc = outcome.doc_id
    assert doc is not None
    performed = perform_phase(runtime, start_phase(runtime, "first", doc))
    complete_phase(runtime, performed)

    assert performed.output == {"text": "burnt"}, performed.output
    figures = metrics.read(connection, "toy", "first")
    assert figures.done == 1
    assert 0.15 <= figures.cpu_s < 0.3  # the helper thread's 0.15 s, not the 0.3 s of wall time
    assert figures.busy_s >= 0.3
