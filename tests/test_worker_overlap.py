"""levers' worker takes its next job while a short one runs: nothing is lost, doubled or held back."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException

from levers import metrics
from levers.documents.store import LocalStore
from levers.worker.courier import COURIER_NICENESS, Courier
from levers.worker.process import REGISTER_GRACE_S, StrandedJobs
from levers.worker.rq_timeout import JobTimeout
from tests.conftest import StartLevers, doc_field, make_project, stop, submit, wait_until


def held(connection: redis.Redis) -> int:
    """Jobs of phase ``first`` that a worker holds: the one it runs and any it took ahead."""
    return StartedJobRegistry("toy.first", connection=connection).count


def first_done(connection: redis.Redis, doc_ids: list[str]) -> list[str]:
    return [d for d in doc_ids if doc_field(connection, d, "first:seconds") is not None]


# How long a worker is left without work in a test of what it records between jobs.
IDLE_S = 5.0


def run_first_phase(
    start_levers: StartLevers, root: Path, connection: redis.Redis, seconds: float, docs: int
) -> list[str]:
    """One worker of phase ``first`` takes ``docs`` documents of ``seconds`` each; their ids."""
    make_project(root, workers=1, seconds=seconds, docs=docs)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        doc_ids = submit(root, "docs")
        wait_until(lambda: len(first_done(connection, doc_ids)) == docs)
    finally:
        stop(supervisor)
    return doc_ids


def test_short_jobs_are_taken_ahead_and_each_runs_once(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    doc_ids = run_first_phase(start_levers, tmp_path, connection, seconds=0.3, docs=5)
    assert [doc_field(connection, d, "first:attempts") for d in doc_ids] == ["1"] * 5
    assert Queue("toy.second", connection=connection).count == 5
    # after the first job, each next one was taken while the one before it ran
    assert taken_while_the_one_before_ran(tmp_path, connection, doc_ids) == [False, True, True, True]


def taken_while_the_one_before_ran(root: Path, connection: redis.Redis, doc_ids: list[str]) -> list[bool]:
    """For each document of phase ``first`` after the first one run: was it taken (the ledger's
    start mark) before the handler of the one before it returned (the handler's own clock)?"""
    store = LocalStore(root / ".levers" / "artifacts")
    runs = sorted(
        (store.output(d, "first")["started"], store.output(d, "first")["ended"], d) for d in doc_ids
    )
    return [float(doc_field(connection, d, "first:started") or 0) < ended for (_, ended, _), (_, _, d) in
            itertools.pairwise(runs)]  # fmt: skip


def test_a_worker_busy_with_a_long_job_leaves_the_next_one_on_the_queue(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    doc_ids = run_first_phase(start_levers, tmp_path, connection, seconds=1.2, docs=3)
    # each was taken only after the one before had run its 1.2 s: meanwhile another worker
    # could have taken it
    assert taken_while_the_one_before_ran(tmp_path, connection, doc_ids) == [False, False]


def test_sigterm_puts_the_job_taken_ahead_back_at_the_head_of_its_queue(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.5, docs=6)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    doc_ids = submit(root, "docs")
    wait_until(lambda: held(connection) == 2, poll_s=0.01)

    stop(supervisor)

    assert supervisor.returncode == 0
    done = first_done(connection, doc_ids)
    waiting = [d for d in doc_ids if d not in done]
    queue = Queue("toy.first", connection=connection, serializer=JSONSerializer)
    assert held(connection) == 0
    # the job taken ahead was the first waiting one: back at the head, the queue keeps its order
    assert [job.args[1] for job in queue.jobs] == waiting
    assert {doc_field(connection, d, "status") for d in waiting} == {"queued"}
    assert {doc_field(connection, d, "first:attempts") or "0" for d in waiting} == {"0"}

    restarted = start_levers("up", "--phase", "first", cwd=root)
    try:
        wait_until(lambda: len(first_done(connection, doc_ids)) == 6)
    finally:
        stop(restarted)
    assert [doc_field(connection, d, "first:attempts") for d in doc_ids] == ["1"] * 6


GATED_PHASES = """
import time
from pathlib import Path

def first(doc, ctx):
    # a document saying "wait N" holds its worker until the test opens the gate; the others return
    words = doc.read_bytes().split()
    if words[0] == b"wait":
        gate = Path(ctx.options["gate"])
        (gate.parent / f"running-{words[1].decode()}").touch()
        while not gate.exists():
            time.sleep(0.01)
    return {}

def second(doc, ctx):
    return {}
"""

GATED_PIPELINE = """
name: toy
phases:
  first:
    handler: gatedphases:first
    accepts: [.txt]
    next: second
    levers: {{workers: 1}}
    options: {{gate: {gate}}}
  second:
    handler: gatedphases:second
"""


def test_a_killed_worker_gives_back_its_running_job_and_the_one_taken_ahead(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    gate = tmp_path / "gate"
    (tmp_path / "gatedphases.py").write_text(GATED_PHASES)
    (tmp_path / "pipeline.yaml").write_text(GATED_PIPELINE.format(gate=gate))
    (tmp_path / "docs").mkdir()
    texts = ["quick", *(f"wait {i}" for i in range(1, 5))]
    for i, text in enumerate(texts):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(text)
    supervisor = start_levers("up", "--phase", "first", cwd=tmp_path)
    doc_ids = submit(tmp_path, *(f"docs/doc{i}.txt" for i in range(len(texts))))
    running, ahead = doc_ids[1:3]

    def running_one_and_holding_the_next() -> bool:
        # doc0 (short) is done; doc1's handler waits at the gate; doc2 is taken ahead, its start recorded
        started = {d for d in doc_ids if doc_field(connection, d, "status") == "running"}
        return (tmp_path / "running-1").exists() and held(connection) == 2 and started == {running, ahead}

    wait_until(running_one_and_holding_the_next, poll_s=0.01)
    [worker] = Worker.all(queue=Queue("toy.first", connection=connection))
    jobs = StartedJobRegistry("toy.first", connection=connection).get_job_ids()
    os.kill(worker.pid, signal.SIGKILL)

    def deaths() -> dict[str, int]:
        held_jobs = [j for j in Job.fetch_many(jobs, connection=connection, serializer=JSONSerializer) if j]
        return {job.args[1]: job.meta.get("worker_deaths", 0) for job in held_jobs}

    # read while the gate holds both jobs: a finished job is not kept
    wait_until(lambda: deaths().get(running) == 1)
    # only the job whose handler ran carries the death and an extra attempt; the one taken ahead neither
    assert deaths() == {running: 1, ahead: 0}
    gate.touch()

    wait_until(lambda: len(first_done(connection, doc_ids)) == len(texts))
    assert {doc_field(connection, d, "status") for d in doc_ids} == {"queued"}  # waiting for second
    output = stop(supervisor)
    assert "requeued 2 job(s)" in output
    attempts = [doc_field(connection, d, "first:attempts") for d in doc_ids]
    assert attempts == ["1", "2", "1", "1", "1"]


ASYNC_PHASES = """
import asyncio

async def wait(doc, ctx):
    await asyncio.sleep(float(doc.read_bytes()))
    return {"loop": id(asyncio.get_running_loop())}
"""

ASYNC_PIPELINE = """
name: waits
phases:
  wait:
    handler: waitphase:wait
    accepts: [.txt]
    timeout: 2
    retries: 0
"""


def test_an_async_job_that_times_out_fails_alone_and_the_worker_goes_on(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    (tmp_path / "waitphase.py").write_text(textwrap.dedent(ASYNC_PHASES))
    (tmp_path / "pipeline.yaml").write_text(ASYNC_PIPELINE)
    for name, seconds in [("a", "0.1"), ("slow", "8"), ("b", "0.11"), ("c", "0.12")]:
        (tmp_path / f"{name}.txt").write_text(seconds)
    supervisor = start_levers("up", cwd=tmp_path)
    try:
        names = ["a", "slow", "b", "c"]
        ids = dict(zip(names, submit(tmp_path, *(f"{n}.txt" for n in names)), strict=True))

        def status(name: str) -> str | None:
            value = connection.hget(f"levers:waits:doc:{ids[name]}", "status")
            return value.decode() if value else None

        wait_until(lambda: all(status(n) in ("done", "failed") for n in ids))
        [worker] = Worker.all(queue=Queue("waits.wait", connection=connection))
        # the same worker ran the jobs after the timeout (RQ's count follows the ledger closely)
        wait_until(lambda: Worker.find_by_key(worker.key, connection=connection).successful_job_count == 3)
    finally:
        stop(supervisor)
    errors = {n: connection.hget(f"levers:waits:doc:{ids[n]}", "error") for n in ids}
    assert {n: status(n) for n in ids} == {"a": "done", "slow": "failed", "b": "done", "c": "done"}, errors
    error = errors["slow"]
    assert error is not None and b"timed out" in error


def test_an_output_json_cannot_hold_fails_the_document_when_the_job_completes(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    handler = "def sets(doc, ctx):\n    return {'words': set(doc.read_bytes().split())}\n"
    (tmp_path / "setphase.py").write_text(handler)
    (tmp_path / "pipeline.yaml").write_text(
        "name: sets\nphases:\n  sets: {handler: setphase:sets, accepts: [.txt], retries: 0}\n"
    )
    (tmp_path / "a.txt").write_text("two words")
    supervisor = start_levers("up", cwd=tmp_path)
    try:
        [doc_id] = submit(tmp_path, "a.txt")
        wait_until(lambda: connection.hget(f"levers:sets:doc:{doc_id}", "status") == b"failed")
    finally:
        stop(supervisor)
    error = connection.hget(f"levers:sets:doc:{doc_id}", "error")
    assert error == b"sets: TypeError: the output of setphase:sets is not JSON-serialisable: " + (
        b"Object of type set is not JSON serializable"
    )
    assert not (tmp_path / ".levers" / "artifacts" / doc_id / "sets.json").exists()


def test_rq_get_current_job_works_inside_sync_and_async_handlers(
    tmp_path: Path, redis_url: str, start_levers: StartLevers
) -> None:
    handlers = textwrap.dedent(
        """
        import rq

        def sync(doc, ctx):
            return {"args": rq.get_current_job().args}

        async def in_async(doc, ctx):
            return {"args": rq.get_current_job().args}
        """
    )
    (tmp_path / "jobphase.py").write_text(handlers)
    (tmp_path / "pipeline.yaml").write_text(
        "name: current\nphases:\n"
        "  first: {handler: jobphase:sync, accepts: [.txt], next: second, retries: 0}\n"
        "  second: {handler: jobphase:in_async, accepts: [], retries: 0}\n"
    )
    (tmp_path / "a.txt").write_text("a")
    supervisor = start_levers("up", cwd=tmp_path)
    try:
        [doc_id] = submit(tmp_path, "a.txt")
        store = LocalStore(tmp_path / ".levers" / "artifacts")
        wait_until(lambda: store.has_output(doc_id, "second"))
    finally:
        stop(supervisor)
    assert store.output(doc_id, "first") == {"args": ["first", doc_id]}
    assert store.output(doc_id, "second") == {"args": ["second", doc_id]}


def test_the_job_timeout_strikes_inside_its_job_only() -> None:
    with pytest.raises(JobTimeoutException, match="1 seconds"), JobTimeout(1, JobTimeoutException):
        time.sleep(5)
    with JobTimeout(5, JobTimeoutException):
        pass
    # an alarm that outlives its job is ignored, not fatal (its handler runs before raise_signal returns)
    signal.raise_signal(signal.SIGALRM)


def test_the_courier_runs_steps_in_order_past_their_failures(caplog: pytest.LogCaptureFixture) -> None:
    done: list[str] = []

    def fails() -> None:
        raise RuntimeError("bookkeeping broke")

    courier = Courier()
    courier.send(done.append, "settled 1")
    courier.send(fails)  # logged; the steps after it still run
    courier.ask(lambda: done.append("took 2") or "job 2")
    assert courier.answer() == "job 2"
    courier.ask(fails)
    with pytest.raises(RuntimeError, match="bookkeeping broke"):
        courier.answer()  # an asked step's failure reaches the asker
    courier.send(time.sleep, 0.2)
    courier.send(done.append, "settled 2")
    courier.stop()  # returns once every step handed over has run

    assert done == ["settled 1", "took 2", "settled 2"]
    assert "the worker's courier failed at fails" in caplog.text


@pytest.mark.skipif(sys.platform != "linux", reason="a thread has a niceness of its own on Linux")
def test_the_courier_yields_the_cpu_to_handlers() -> None:
    worker = os.getpriority(os.PRIO_PROCESS, 0)
    courier = Courier()
    courier.ask(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
    try:
        assert courier.answer() == worker + COURIER_NICENESS
    finally:
        courier.stop()
    assert os.getpriority(os.PRIO_PROCESS, 0) == worker  # the handlers' thread keeps its own


def test_a_job_a_dying_worker_took_but_never_registered_runs_again(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=0.2, docs=2)
    stranded_doc, other_doc = submit(root, "docs")
    queue = Queue("toy.first", connection=connection, serializer=JSONSerializer)
    # what a worker killed between taking a job and registering it leaves behind
    stranded_job = connection.lmove(queue.key, queue.intermediate_queue.key)
    assert stranded_job is not None
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        wait_until(lambda: doc_field(connection, other_doc, "first:seconds") is not None)
        assert doc_field(connection, stranded_doc, "first:seconds") is None
        [worker] = Worker.all(queue=queue)
        os.kill(worker.pid, signal.SIGKILL)

        wait_until(lambda: doc_field(connection, stranded_doc, "first:seconds") is not None)
    finally:
        output = stop(supervisor)
    assert f"requeued job {stranded_job.decode()}" in output
    assert queue.intermediate_queue.get_job_ids() == []


def test_stranded_jobs_go_back_after_the_grace_period_only_if_still_unregistered(
    connection: redis.Redis,
) -> None:
    queue = Queue("stranded.test", connection=connection, serializer=JSONSerializer)
    stranded, registered = (queue.enqueue("levers.worker.jobs.run_phase", "p", d) for d in ("a", "b"))
    for _ in range(2):  # what workers killed between taking and registering a job leave behind
        connection.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    now = [100.0]
    jobs = StrandedJobs(connection, clock=lambda: now[0])

    jobs.note(queue.name)
    now[0] += REGISTER_GRACE_S / 2
    assert jobs.requeue_due() == []  # too soon: a live worker may be about to register them
    registry = queue.started_job_registry  # a live worker registers its job (job id:execution id)
    connection.zadd(registry.key, {f"{registered.id}:execution": time.time() + 60})
    now[0] += REGISTER_GRACE_S / 2

    assert jobs.requeue_due() == [stranded.id]
    assert queue.get_job_ids() == [stranded.id]
    assert queue.intermediate_queue.get_job_ids() == [registered.id]
    assert jobs.requeue_due() == []  # each noted job is looked at once


def test_the_last_sweep_waits_out_the_grace_period(connection: redis.Redis) -> None:
    queue = Queue("stranded.last", connection=connection, serializer=JSONSerializer)
    job = queue.enqueue("levers.worker.jobs.run_phase", "p", "a")
    connection.lmove(queue.key, queue.intermediate_queue_key, "LEFT", "RIGHT")
    now, slept = [100.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    jobs = StrandedJobs(connection, clock=lambda: now[0], sleep=sleep)
    jobs.note(queue.name)
    now[0] += REGISTER_GRACE_S / 4

    assert jobs.requeue_due(wait=True) == [job.id]  # the supervisor's last tick: nothing comes after
    assert slept == [pytest.approx(REGISTER_GRACE_S * 3 / 4)]
    assert queue.get_job_ids() == [job.id]


def test_a_worker_records_what_taking_and_settling_cost_between_jobs_not_its_idle_time(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    make_project(tmp_path, workers=1, seconds=0.05, docs=6)
    supervisor = start_levers("up", "--phase", "first", cwd=tmp_path)
    try:
        doc_ids = submit(tmp_path, "docs")
        wait_until(lambda: len(first_done(connection, doc_ids)) == 6)
        time.sleep(IDLE_S)  # the worker waits for work: not a cost of the next job
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "late.txt").write_text("one more, after a pause")
        late = submit(tmp_path, "late")
        wait_until(lambda: len(first_done(connection, late)) == 1)
    finally:
        stop(supervisor)
    buckets = metrics.minute_buckets(connection, "toy", "first", 5, time.time())
    gaps, gap_s = (sum(b.get(f, 0.0) for b in buckets.values()) for f in ("gaps", "gap_s"))
    assert gaps == 6  # every job but the worker's first
    assert 0 < gap_s < IDLE_S
