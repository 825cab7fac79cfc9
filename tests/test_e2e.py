"""End to end: the real `levers` command, real worker processes, the real embedded server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

from tests.conftest import StartLevers, doc_field, levers, make_project, stop, submit, wait_until


@pytest.mark.e2e
def test_run_processes_every_document_and_reports_the_failed_one(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path)
    (root / "docs" / "bad.txt").write_text("FAIL on purpose")
    (root / "docs" / "image.png").write_bytes(b"\x89PNG")

    result = levers("run", "docs", cwd=root)

    assert result.returncode == 1
    assert "image.png: unsupported type '.png'" in result.stderr
    assert "bad.txt" in result.stderr and "ValueError: document says FAIL" in result.stderr
    assert result.stdout.count("done") == 3
    assert "Traceback" not in result.stderr


@pytest.mark.e2e
def test_run_exits_zero_when_all_documents_finish(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path)

    result = levers("run", "docs", cwd=root)

    assert result.returncode == 0, result.stderr
    ids = connection.zrange("levers:toy:finished", 0, -1)  # done documents, by when they finished
    assert len(ids) == 3 and connection.zcard("levers:toy:docs") == 0
    assert all(doc_field(connection, i.decode(), "status") == "done" for i in ids)
    outputs = [json.loads((root / ".levers/artifacts" / i.decode() / "second.json").read_text()) for i in ids]
    assert outputs == [{"words": 6}] * 3


def test_submit_deduplicates_and_reports_bad_paths_per_file(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=2)

    first = levers("submit", "docs", cwd=root)
    again = levers("submit", "docs/doc0.txt", "missing.txt", "docs/*.txt", cwd=root)
    forced = levers("submit", "--force", "docs/doc0.txt", cwd=root)

    assert first.returncode == 0 and len(first.stdout.split()) == 2
    assert again.returncode == 2
    assert "missing.txt: no such file or directory" in again.stderr
    assert "already submitted" in again.stderr
    assert Queue("toy.first", connection=connection).count == 3  # 2, plus the forced one
    assert forced.returncode == 0


def test_killed_worker_job_runs_again_and_completes(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=2, docs=1)
    supervisor = start_levers("up", cwd=root)
    try:
        [doc_id] = submit(root, "docs/doc0.txt")
        wait_until(lambda: doc_field(connection, doc_id, "status") == "running")
        [worker] = Worker.all(queue=Queue("toy.first", connection=connection))
        os.kill(worker.pid, signal.SIGKILL)

        wait_until(lambda: doc_field(connection, doc_id, "status") == "done")
        assert doc_field(connection, doc_id, "first:attempts") == "2"
        assert len(Worker.all(queue=Queue("toy.first", connection=connection))) == 1
    finally:
        output = stop(supervisor)
    assert "requeued 1 job(s)" in output


def test_sigterm_lets_the_running_job_finish(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=2, docs=1)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    [doc_id] = submit(root, "docs/doc0.txt")
    wait_until(lambda: doc_field(connection, doc_id, "status") == "running")

    stop(supervisor)

    assert supervisor.returncode == 0
    assert doc_field(connection, doc_id, "first:seconds") is not None
    assert Queue("toy.second", connection=connection).count == 1  # handed on, waiting for its phase
    assert Worker.all(connection=connection) == []


def test_second_signal_stops_at_once_and_requeues(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=1, seconds=30, docs=1)
    supervisor = start_levers("up", cwd=root)
    [doc_id] = submit(root, "docs/doc0.txt")
    wait_until(lambda: doc_field(connection, doc_id, "status") == "running")

    supervisor.send_signal(signal.SIGTERM)
    # the kernel merges a signal sent while the same one is pending: wait until the first is handled
    [worker] = Worker.all(queue=Queue("toy.first", connection=connection))
    wait_until(lambda: Worker.find_by_key(worker.key, connection=connection).shutdown_requested_date)
    supervisor.send_signal(signal.SIGTERM)
    supervisor.communicate(timeout=20)

    assert supervisor.returncode == 0
    [job] = Queue("toy.first", connection=connection).jobs
    assert doc_field(connection, doc_id, "first:seconds") is None
    # the supervisor cut it short: no worker-death mark, and its attempt taken back
    assert "worker_deaths" not in job.meta
    assert doc_field(connection, doc_id, "first:attempts") == "0"


@pytest.mark.e2e
def test_failed_document_is_retried_then_visible_in_status_and_show(
    tmp_path: Path, connection: redis.Redis
) -> None:
    root = make_project(tmp_path, docs=0)
    (root / "docs" / "bad.txt").write_text("FAIL")
    levers("run", "docs", cwd=root)

    status = json.loads(levers("status", "--json", cwd=root).stdout)
    [doc_id] = [i.decode() for i in connection.zrange("levers:toy:docs", 0, -1)]
    shown = levers("show", doc_id[:8], cwd=root)

    first = next(p for p in status["phases"] if p["phase"] == "first")
    assert (first["failed"], first["retried"]) == (1, 1)
    assert shown.returncode == 0
    assert "failed" in shown.stdout and "document says FAIL" in shown.stdout + shown.stderr
    assert doc_field(connection, doc_id, "first:attempts") == "2"


@pytest.mark.e2e
def test_embedded_server_restart_loses_no_queued_document(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    root = make_project(tmp_path, docs=3)
    try:
        assert len(submit(root, "docs")) == 3
        assert "stopped" in levers("down", cwd=root).stderr

        again = levers("submit", "docs", cwd=root)  # starts the server again, on its append-only file
        assert again.stderr.count("already submitted") == 3
        status = json.loads(levers("status", "--json", cwd=root).stdout)
        assert status["phases"][0]["queued"] == 3

        result = levers("run", "docs", cwd=root)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("done") == 3
    finally:
        levers("down", cwd=root)


def test_unreachable_redis_is_one_line_without_the_password(tmp_path: Path) -> None:
    root = make_project(tmp_path, docs=1)
    url = "redis://:hunter2@127.0.0.1:1/0"

    result = levers("submit", "docs", cwd=root, env={"REDIS_URL": url})

    assert result.returncode == 1
    assert "hunter2" not in result.stdout + result.stderr
    assert "redis://:***@127.0.0.1:1/0" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_reports_located_errors_and_exit_codes(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    good = levers("validate", cwd=root)
    pipeline = root / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("{workers: 1}", "{workers: 1, semaphor: 3}"))
    bad = levers("validate", cwd=root)
    as_json = json.loads(levers("validate", "--json", cwd=root).stdout)

    assert good.returncode == 0
    assert bad.returncode == 2
    line = next(n for n, text in enumerate(pipeline.read_text().splitlines(), 1) if "semaphor:" in text)
    assert f"pipeline.yaml:{line}:" in bad.stderr
    assert "did you mean 'semaphore'?" in bad.stderr
    assert as_json["valid"] is False and as_json["problems"][0]["line"] == line


def test_rq_info_sees_levers_queues_and_workers(
    tmp_path: Path, redis_url: str, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2)
    supervisor = start_levers("up", "--phase", "first", cwd=root)
    try:
        connection = redis.Redis.from_url(redis_url)
        wait_until(lambda: len(Worker.all(connection=connection)) == 2)
        info = subprocess.run(
            ["rq", "info", "--url", redis_url], capture_output=True, text=True, check=True, timeout=30
        )
    finally:
        stop(supervisor)
    # second is listed though no worker serves it and no job reached it: `levers up` registers
    # every phase's queues (one per priority lane) when it starts
    for phase in ("first", "second"):
        assert all(f"toy.{phase}{lane} " in info.stdout for lane in ("", ":high", ":low")), info.stdout
    assert "2 workers, 6 queues" in info.stdout


def test_stdin_document_goes_to_the_bytes_phase(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)
    (root / "pipeline.yaml").write_text(
        (root / "pipeline.yaml").read_text()
        + textwrap.indent(
            textwrap.dedent("""
            upload:
              handler: toyphases:first
              input: bytes
              accepts: [.txt]
              next: second
            """),
            "  ",
        )
    )

    result = levers("submit", "-", "--name", "note.txt", cwd=root, stdin=b"from a web upload")

    assert result.returncode == 0, result.stderr
    [doc_id] = result.stdout.split()
    assert Queue("toy.upload", connection=connection).count == 1
    assert connection.get(f"levers:toy:blob:{doc_id}") == b"from a web upload"
    assert not (root / ".levers" / "artifacts" / doc_id).exists()


def test_submit_bytes_api_for_applications(tmp_path: Path, connection: redis.Redis) -> None:
    import levers as api

    root = make_project(tmp_path, docs=0)
    doc_id = api.submit_bytes(b"an upload held in memory", "upload.txt", pipeline=root / "pipeline.yaml")

    assert doc_field(connection, doc_id, "status") == "queued"
    assert doc_field(connection, doc_id, "name") == "upload.txt"
    assert Queue("toy.first", connection=connection).count == 1


def test_a_document_whose_bytes_are_gone_fails_alone_with_the_reason(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    import levers as api

    root = make_project(tmp_path, workers=1, docs=0)
    with (root / "pipeline.yaml").open("a") as pipeline:
        pipeline.write("  upload: {handler: toyphases:first, input: bytes, accepts: [.txt], next: second}\n")
    lost, kept = (api.submit_bytes(text, "upload.txt", pipeline=root / "pipeline.yaml")
                  for text in (b"these bytes will be lost", b"these bytes stay"))  # fmt: skip
    assert connection.delete(f"levers:toy:blob:{lost}") == 1
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: doc_field(connection, lost, "status") == "failed")
        wait_until(lambda: doc_field(connection, kept, "status") == "done")
    finally:
        stop(supervisor)
    assert doc_field(connection, lost, "error") == (
        "upload: PhaseError: the document's bytes are gone from Redis; submit it again"
    )
    assert doc_field(connection, lost, "upload:attempts") == "3"  # retried as configured (2 by default)
    # the kept one went upload -> second: second read upload's output, though first also feeds it
    assert doc_field(connection, kept, "second:seconds") is not None


def test_workers_stop_when_their_supervisor_is_killed(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=0)
    supervisor = start_levers("up", cwd=root)
    wait_until(lambda: len(Worker.all(connection=connection)) == 3)

    supervisor.kill()
    supervisor.communicate(timeout=10)

    wait_until(lambda: Worker.all(connection=connection) == [], timeout_s=20)


def test_a_phase_whose_input_is_not_in_this_hosts_store_fails_saying_so(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    """Two hosts on one Redis with stores of their own: the next phase runs where the output of the
    one before is not. It fails saying why (it was the handler's own error about its input)."""
    root = make_project(tmp_path, workers=1, docs=1)
    first = start_levers("up", "--phase", "first", cwd=root)
    [doc_id] = submit(root, "docs/doc0.txt")
    wait_until(lambda: doc_field(connection, doc_id, "first:seconds") is not None)
    stop(first)
    output = root / ".levers" / "artifacts" / doc_id / "first.json"
    assert output.exists()
    output.unlink()  # the other host's store holds it

    second = start_levers("up", "--phase", "second", cwd=root)
    wait_until(lambda: doc_field(connection, doc_id, "status") == "failed", timeout_s=60)
    stop(second)

    failed = json.loads(levers("failed", "--json", cwd=root).stdout)
    [entry] = [f for f in failed if f["id"] == doc_id]
    assert "no output of first for this document in the artifact store" in entry["error"]
    assert "must share one store:" in entry["error"]
