"""`levers up` as a service: one line per event, JSON lines on request, version, help, .gitignore."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker

from levers.cli.app import app
from levers.supervisor.health import HealthFile
from tests.conftest import StartLevers, free_port, levers, make_project, stop, submit, wait_until


def run_up(root: Path, connection: redis.Redis, start_levers: StartLevers, *flags: str) -> list[str]:
    """`levers up` over 8 documents, one of them failing twice, and a rescale: what it printed."""
    (root / "docs" / "bad.txt").write_text("FAIL on purpose")
    supervisor = start_levers("up", *flags, cwd=root)
    try:
        submit(root, "docs")
        wait_until(lambda: connection.hget("levers:toy:phase:second:totals", "done") == b"7")
        wait_until(lambda: connection.hget("levers:toy:phase:first:totals", "failed") == b"1")
        assert levers("set", "first.workers=1", cwd=root).returncode == 0
        wait_until(lambda: len(Worker.all(queue=Queue("toy.first", connection=connection))) == 1)
    finally:
        output = stop(supervisor)
    return output.splitlines()


def test_up_logs_one_concise_line_per_event(
    tmp_path: Path, redis_url: str, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=7)
    port = free_port()
    lines = run_up(root, connection, start_levers, "--metrics-port", str(port))

    started = lines[0]
    assert "started: phases first, second; 3 worker(s); Redis redis://:***@" in started
    assert redis_url.split("@")[0].split(":")[-1] not in started  # the password
    assert f"metrics at http://127.0.0.1:{port}/metrics" in started
    assert started.endswith("Ctrl-C to stop")
    failed = [line for line in lines if "job failed" in line]
    assert len(failed) == 2, lines  # the attempt and its one retry
    assert (
        "job failed: first: bad.txt (" in failed[0]
        and "ValueError: document says FAIL; retrying (1 left)" in failed[0]
    )
    assert failed[1].endswith("no retry left")
    # said once, by the supervisor (the metrics exporter follows the file too)
    assert len([line for line in lines if "pipeline.yaml changed: first.workers 2 -> 1" in line]) == 1
    assert any("first: stopping 1 worker(s)" in line for line in lines)
    assert lines[-1].endswith("stopped")
    # no RQ line per job, no traceback: about a dozen lines for 8 documents
    assert not [line for line in lines if "toy.first:" in line or "Traceback" in line or "Listening" in line]
    assert len(lines) < 20, lines


def test_verbose_adds_rqs_lines_per_job(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=7)
    lines = run_up(root, connection, start_levers, "-v")
    # RQ's line for each job it dequeues (those a worker claims ahead go by without one)
    assert [line for line in lines if "toy.first: first: doc" in line]
    assert any("Traceback" in line for line in lines)


def test_json_logs_are_one_object_per_line(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, workers=2, docs=7)
    records = [json.loads(line) for line in run_up(root, connection, start_levers, "--log-format", "json")]

    assert records[0]["message"].startswith("started: phases first, second")
    assert {"time", "level", "logger", "pid", "message"} <= set(records[0])
    failed = [r for r in records if r["message"].startswith("job failed")]
    assert [(r["level"], r["phase"], r["queue"]) for r in failed] == [("warning", "first", "toy.first")] * 2


def test_up_with_a_fixed_count_and_a_health_file_as_in_a_pod(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    """What `levers deploy k8s` runs: one worker whatever the file declares, and a heartbeat."""
    root = make_project(tmp_path, workers=3, docs=2)
    health = root / "health"
    supervisor = start_levers(
        "up", "--phase", "first", "--workers", "1", "--health-file", str(health), cwd=root
    )
    try:
        wait_until(health.exists)
        first_beat = health.stat().st_mtime
        wait_until(lambda: health.stat().st_mtime > first_beat)  # touched again while it runs
        wait_until(lambda: len(Worker.all(queue=Queue("toy.first", connection=connection))) == 1)
        submit(root, "docs")
        wait_until(lambda: connection.hget("levers:toy:phase:first:totals", "done") == b"2")
        assert len(Worker.all(queue=Queue("toy.first", connection=connection))) == 1
    finally:
        output = stop(supervisor)
    assert "started: phases first; 1 worker(s)" in output


def test_a_heartbeat_left_by_an_earlier_run_is_removed_at_the_start(tmp_path: Path) -> None:
    stale = tmp_path / "health"
    stale.touch()
    health = HealthFile(stale)  # a probe before the first beat must fail, as the loop has not run
    assert not stale.exists()
    health.beat()
    assert stale.exists()


def test_a_health_file_it_cannot_write_is_refused_at_once(tmp_path: Path) -> None:
    root = make_project(tmp_path)
    result = levers("up", "--health-file", str(root / "missing" / "health"), cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: cannot write the health file {root / 'missing' / 'health'}: its directory is not "
        "writable (give --health-file a path in a writable directory)"
    ]


def test_version(tmp_path: Path) -> None:
    result = levers("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.startswith("levers ") and result.stdout.split()[1][0].isdigit()


def commands() -> list[list[str]]:
    found: list[list[str]] = [[]]
    for info in app.registered_commands:
        found.append([info.name or info.callback.__name__])  # type: ignore[union-attr]
    for group in app.registered_groups:
        assert group.name and group.typer_instance
        found += [[group.name]]
        found += [
            [group.name, info.name or info.callback.__name__]
            for info in group.typer_instance.registered_commands
        ]  # type: ignore[union-attr]
    return found


@pytest.mark.parametrize("command", commands(), ids=lambda c: " ".join(c) or "levers")
def test_help_shows_no_python_types(tmp_path: Path, command: list[str]) -> None:
    result = levers(*command, "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.returncode == 0
    for python_type in ("<bool>", "<str>", "<int>", "<float>", "<path>", "<list[", "{"):
        assert python_type not in result.stdout, result.stdout


def test_a_git_project_stays_clean(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=2)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    assert levers("run", "docs", cwd=root).returncode == 0
    assert levers("set", "first.semaphore=3", cwd=root).returncode == 0

    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root,
                            capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert sorted(line[3:] for line in status.splitlines()) == [
        "docs/doc0.txt", "docs/doc1.txt", "pipeline.yaml", "toyphases.py"
    ]  # fmt: skip
