"""Batches: a worker takes up to a phase's ``batch.size`` jobs in one atomic step, runs them
together, fails a document alone, and loses none when it is killed mid-batch."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from levers import keys
from levers.documents.lanes import phase_lanes
from levers.worker.lane_take import group, take_many
from tests.conftest import StartLevers, doc_field, levers, stop, submit, wait_until

BATCH_PHASES = """
import json
import time
from pathlib import Path

from levers import Permanent, batch_handler


def _log(ctx, entry):
    with Path(ctx.options["log"]).open("a") as out:
        out.write(json.dumps(entry) + "\\n")


@batch_handler
def together(docs, ctx):
    _log(ctx, [doc.id for doc in docs])
    gate = ctx.options.get("gate")
    if gate:  # holds the batch until the test opens the gate
        Path(gate + ".running").touch()
        while not Path(gate).exists():
            time.sleep(0.01)
    texts = [doc.read_bytes().decode() for doc in docs]
    return [Permanent("document says FAIL") if "FAIL" in t else {"text": t} for t in texts]


def each(doc, ctx):
    ctx.seen = getattr(ctx, "seen", 0) + 1  # the context is the batch's: it counts its documents
    _log(ctx, ctx.seen)
    text = doc.read_bytes().decode()
    if "FAIL" in text:
        raise ValueError("document says FAIL")
    return {"text": text}


def second(doc, ctx):
    return {"words": len(doc.input["text"].split())}
"""

BATCH_PIPELINE = """
name: toy
phases:
  first:
    handler: batchphases:{handler}
    accepts: [.txt]
    next: second
    retries: 1
    retry_delay: 0
    levers: {{workers: 1}}
    batch: {{size: 4, wait_ms: 300}}
    options: {{log: {log}{gate}}}
  second:
    handler: batchphases:second
"""


def batch_project(root: Path, handler: str, docs: list[str], gate: Path | None = None) -> Path:
    (root / "batchphases.py").write_text(BATCH_PHASES)
    extra = f", gate: {gate}" if gate is not None else ""
    (root / "pipeline.yaml").write_text(
        BATCH_PIPELINE.format(handler=handler, log=root / "calls.log", gate=extra)
    )
    (root / "docs").mkdir()
    for i, text in enumerate(docs):
        (root / "docs" / f"doc{i}.txt").write_text(text)
    return root


def calls(root: Path) -> list[object]:
    path = root / "calls.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def settled(connection: redis.Redis, doc_ids: list[str]) -> bool:
    return all(doc_field(connection, d, "status") in ("done", "failed") for d in doc_ids)


def test_one_take_moves_up_to_a_batch_of_jobs_to_their_holding_lists(connection: redis.Redis) -> None:
    high, normal, low = phase_lanes(connection, "toy", "first")
    for queue, count in ((high, 2), (normal, 3), (low, 1)):
        for i in range(count):
            queue.push_job_id(f"{queue.name}-{i}")
    [served] = group([high, normal, low])

    took = take_many(connection, served, 0.0, 4)

    # highest lane first, as four takes of one would, and every one in its lane's holding list
    assert [(t.queue.name, t.job_id) for t in took] == [
        ("toy.first:high", "toy.first:high-0"), ("toy.first:high", "toy.first:high-1"),
        ("toy.first", "toy.first-0"), ("toy.first", "toy.first-1"),
    ]  # fmt: skip
    assert high.intermediate_queue.get_job_ids() == ["toy.first:high-0", "toy.first:high-1"]
    assert normal.intermediate_queue.get_job_ids() == ["toy.first-0", "toy.first-1"]
    rest = take_many(connection, served, 0.0, 4)
    assert [t.job_id for t in rest] == ["toy.first-2", "toy.first:low-0"]
    assert take_many(connection, served, 0.0, 4) == []
    assert not connection.exists(keys.lane_wake("toy.first"))  # emptied: idle workers block


def test_a_batch_handler_gets_batches_and_a_failed_document_fails_alone(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = batch_project(tmp_path, "together", [f"document {i} has five words" for i in range(8)] + ["FAIL"])
    doc_ids = submit(root, "docs")  # all queued before a worker looks: the first take fills a batch
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: settled(connection, doc_ids), timeout_s=60)
    finally:
        stop(supervisor)

    batches = calls(root)
    assert len(batches[0]) == 4 and max(len(b) for b in batches) == 4  # type: ignore[arg-type]
    assert sorted(d for b in batches for d in b) == sorted(doc_ids)  # type: ignore[union-attr]
    failed = doc_ids[-1]
    assert doc_field(connection, failed, "status") == "failed"
    assert doc_field(connection, failed, "first:attempts") == "1"  # Permanent: no retry
    assert "document says FAIL" in (doc_field(connection, failed, "first:error") or "")
    for doc_id in doc_ids[:-1]:
        assert doc_field(connection, doc_id, "status") == "done"
        assert doc_field(connection, doc_id, "first:attempts") == "1"


def test_a_per_document_handler_runs_a_batch_under_one_context_and_fails_one_alone(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = batch_project(tmp_path, "each", ["FAIL", *(f"document {i} has five words" for i in range(7))])
    doc_ids = submit(root, "docs")
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: settled(connection, doc_ids), timeout_s=60)
    finally:
        stop(supervisor)

    assert calls(root)[:4] == [1, 2, 3, 4]  # the first batch's four documents shared one context
    assert doc_field(connection, doc_ids[0], "status") == "failed"
    assert doc_field(connection, doc_ids[0], "first:attempts") == "2"  # retried, per retries: 1
    assert all(doc_field(connection, d, "status") == "done" for d in doc_ids[1:])


def test_a_worker_killed_mid_batch_loses_no_job(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    gate = tmp_path / "gate"
    root = batch_project(tmp_path, "together", [f"document {i}" for i in range(6)], gate=gate)
    doc_ids = submit(root, "docs")
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    registry = StartedJobRegistry("toy.first", connection=connection)
    wait_until(lambda: Path(f"{gate}.running").exists() and registry.count == 4, poll_s=0.01)
    [worker] = Worker.all(queue=Queue("toy.first", connection=connection))
    held = registry.get_job_ids()
    first_batch = calls(root)[0]

    os.kill(worker.pid, signal.SIGKILL)

    def deaths() -> dict[str, int]:
        jobs = [j for j in Job.fetch_many(held, connection=connection, serializer=JSONSerializer) if j]
        return {job.args[1]: job.meta.get("worker_deaths", 0) for job in jobs}

    # every job of the batch goes back; only the one the handler's call was marked with carries a death
    wait_until(lambda: sum(deaths().values()) == 1)
    assert isinstance(first_batch, list)
    assert deaths() == {first_batch[0]: 1, **dict.fromkeys(first_batch[1:], 0)}
    gate.touch()
    wait_until(lambda: all(doc_field(connection, d, "first:seconds") for d in doc_ids), timeout_s=60)
    output = stop(supervisor)

    assert "requeued 4 job(s)" in output
    assert {doc_field(connection, d, "status") for d in doc_ids} == {"queued"}  # each handed on once
    assert Queue("toy.second", connection=connection, serializer=JSONSerializer).count == len(doc_ids)
    # the marked job's attempt stays counted; the others' were taken back as they went back
    attempts = {d: doc_field(connection, d, "first:attempts") for d in doc_ids}
    assert attempts == {d: "2" if d == first_batch[0] else "1" for d in doc_ids}


def test_batch_settings_are_checked_and_levers_set_changes_them(tmp_path: Path) -> None:
    root = batch_project(tmp_path, "together", ["one"])
    text = (root / "pipeline.yaml").read_text()
    (root / "pipeline.yaml").write_text(text.replace("size: 4", "size: 0").replace("wait_ms", "wait_ms_"))

    checked = levers("validate", cwd=root)

    assert checked.returncode == 2
    lines = checked.stdout.splitlines() + checked.stderr.splitlines()
    assert any("batch.size" in line for line in lines), lines
    assert any("wait_ms_" in line and "did you mean 'wait_ms'" in line for line in lines), lines
    assert "Traceback" not in checked.stderr

    (root / "pipeline.yaml").write_text(text)
    assert levers("set", "first.batch.size=10", "first.batch.wait_ms=50", cwd=root).returncode == 0
    assert levers("get", "first.batch.size", cwd=root).stdout.strip() == "10"
    assert "batch: {size: 10, wait_ms: 50}" in (root / "pipeline.yaml").read_text()


def test_a_batch_takes_stored_results_and_calls_the_handler_for_the_rest_only(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = batch_project(tmp_path, "together", [f"document {i} has five words" for i in range(4)])
    doc_ids = submit(root, "docs")
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: settled(connection, doc_ids), timeout_s=60)
        before = len(calls(root))
        (root / "docs" / "new.txt").write_text("a document the batch has not seen")
        again = submit(root, "docs", "--force")  # the four known ones, and one new
        [new] = [d for d in again if d not in doc_ids]
        wait_until(lambda: doc_field(connection, new, "status") == "done", timeout_s=60)
        wait_until(lambda: settled(connection, again), timeout_s=60)
    finally:
        stop(supervisor)

    assert [d for batch in calls(root)[before:] for d in batch] == [new]  # type: ignore[union-attr]
    for doc_id in doc_ids:
        assert doc_field(connection, doc_id, "first:reused") == "1"
