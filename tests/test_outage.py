"""Redis goes away and comes back: a server of the test's own, and levers' embedded one, killed
mid-run and restarted with their data; the supervisor and its workers wait, reconnect and go on."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from rq import Worker

from levers.server.embedded import EmbeddedServer, valkey_binary
from tests.conftest import StartLevers, doc_field, free_port, levers, stop, submit, wait_until

# How long the server stays down: the fault's length, not a wait for something to happen.
OUTAGE_S = 5.0
SHORT_DOCS = 30

PHASES = """
import time

def first(doc, ctx):
    seconds = float(doc.read_bytes().split()[0])
    time.sleep(seconds)
    return {"seconds": seconds}

def second(doc, ctx):
    return {"slept": doc.input["seconds"]}
"""

PIPELINE = """
name: toy
phases:
  first:
    handler: outagephases:first
    accepts: [.txt]
    next: second
    levers: {workers: 2}
  second:
    handler: outagephases:second
    levers: {workers: 1}
"""


class OwnServer:
    """A valkey-server the test runs itself (not levers' embedded one): append-only, on one port,
    killed and started again over the same data."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra: str) -> None:
        args = [str(valkey_binary()), "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.directory), "--appendonly", "yes", "--save", "", *extra]  # fmt: skip
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, timeout_s=10)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def _answers(self) -> bool:
        try:
            redis.Redis(port=self.port, socket_connect_timeout=0.5).ping()
        except redis.AuthenticationError:
            return True
        except redis.ConnectionError:
            return False
        return True


@pytest.fixture
def own_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OwnServer]:
    directory = tmp_path / "own-redis"
    directory.mkdir()
    server = OwnServer(directory)
    server.start()
    monkeypatch.setenv("REDIS_URL", server.url)
    try:
        yield server
    finally:
        server.stop()


def make_project(root: Path, long_s: float) -> Path:
    """One document whose first phase takes ``long_s``, and SHORT_DOCS that take 0.1 s each."""
    (root / "outagephases.py").write_text(PHASES)
    (root / "pipeline.yaml").write_text(PIPELINE)
    (root / "docs").mkdir()
    (root / "docs" / "long.txt").write_text(f"{long_s} seconds for this one")
    for i in range(SHORT_DOCS):
        (root / "docs" / f"short{i:02}.txt").write_text(f"0.1 seconds for short document {i}")
    return root


def submit_all(root: Path, connection: redis.Redis) -> tuple[str, list[str]]:
    """Every document, once the workers are up; the long one's id and the short ones'."""
    wait_until(lambda: len(Worker.all(connection=connection)) == 3)
    doc_ids = submit(root, "docs")
    [long_doc] = [d for d in doc_ids if doc_field(connection, d, "name") == "long.txt"]
    return long_doc, [d for d in doc_ids if d != long_doc]


def in_flight(connection: redis.Redis, long_doc: str, short_docs: list[str]) -> bool:
    """The long document runs, and short ones go through the other worker."""
    short_firsts = sum(doc_field(connection, d, "first:seconds") is not None for d in short_docs)
    return doc_field(connection, long_doc, "status") == "running" and short_firsts >= 1


def done(connection: redis.Redis, doc_ids: list[str]) -> int:
    return sum(doc_field(connection, d, "status") == "done" for d in doc_ids)


def one_line_each_way(output: str) -> bool:
    """Each process said once that Redis was lost and at most once that it was back (one that had
    nothing to ask of it before the stop may not have looked again); the supervisor said both."""
    lines = outage_lines(output)
    supervisor = [counts for process, counts in lines.items() if process.startswith("[supervisor")]
    return (
        supervisor == [(1, 1)] and len(lines) >= 4 and all(lost == 1 >= back for lost, back in lines.values())
    )


def outage_lines(output: str) -> dict[str, tuple[int, int]]:
    """Per process (its log prefix): the lines saying Redis was lost, and back."""
    lost: Counter[str] = Counter()
    back: Counter[str] = Counter()
    for line in output.splitlines():
        process = re.search(r"\[(\w+) pid=(\d+)", line)
        if process and "lost the connection to Redis" in line:
            lost[process.group(0)] += 1
        elif process and re.search(r"Redis at \S+ is back after", line):
            back[process.group(0)] += 1
    return {p: (lost[p], back[p]) for p in lost | back}


def supervisor_lines(output: str) -> tuple[int, int]:
    """The supervisor's lines saying Redis was lost, and back."""
    found = [counts for process, counts in outage_lines(output).items() if process.startswith("[supervisor")]
    return found[0] if found else (0, 0)


def test_a_server_killed_mid_run_comes_back_and_every_document_is_done_once(
    tmp_path: Path, own_server: OwnServer, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, long_s=4)
    connection = redis.Redis.from_url(own_server.url)
    supervisor = start_levers("up", cwd=root)
    try:
        long_doc, short_docs = submit_all(root, connection)
        wait_until(lambda: in_flight(connection, long_doc, short_docs))
        workers = sorted(w.name for w in Worker.all(connection=connection))
        own_server.kill()
        time.sleep(OUTAGE_S)
        own_server.start()

        wait_until(lambda: done(connection, [long_doc, *short_docs]) == SHORT_DOCS + 1, timeout_s=60)
        assert supervisor.poll() is None  # still supervising, not stuck or gone
        assert sorted(w.name for w in Worker.all(connection=connection)) == workers  # none died of it
        status = json.loads(levers("status", "--json", cwd=root).stdout)
    finally:
        output = stop(supervisor)

    assert supervisor.returncode == 0, output
    for phase in ("first", "second"):  # none completed twice, none failed or retried
        totals = connection.hgetall(f"levers:toy:phase:{phase}:totals")
        assert totals == {b"done": str(SHORT_DOCS + 1).encode()}, (phase, totals)
    # the long job ended while the server was away: its completion waited for it, the job did not run again
    assert doc_field(connection, long_doc, "first:attempts") == "1"
    assert [s["lapsed"] for s in status["supervisors"]] == [False]
    assert [(p["workers_alive"], p["running"], p["stranded"]) for p in status["phases"]] == [
        (2, 0, 0),
        (1, 0, 0),
    ]
    assert one_line_each_way(output), outage_lines(output)
    assert "Traceback" not in output


def test_the_embedded_server_killed_comes_back_by_itself_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, start_levers: StartLevers
) -> None:
    """Nobody restarts it here: `levers up` starts its embedded server again, on the same port."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    root = make_project(tmp_path, long_s=4)
    server = EmbeddedServer(valkey_binary(), root / ".levers" / "redis")
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: server.running() is not None)
        running = server.running()
        assert running is not None
        connection = redis.Redis.from_url(running.url)
        long_doc, short_docs = submit_all(root, connection)
        wait_until(lambda: in_flight(connection, long_doc, short_docs))
        os.kill(running.pid, signal.SIGKILL)

        wait_until(lambda: (again := server.running()) is not None and again.pid != running.pid, timeout_s=60)
        assert server.recorded_url() == running.url  # the same address: the workers find it there

        wait_until(lambda: done(connection, [long_doc, *short_docs]) == SHORT_DOCS + 1, timeout_s=60)
        assert supervisor.poll() is None
        totals = connection.hgetall("levers:toy:phase:second:totals")
        long_attempts = doc_field(connection, long_doc, "first:attempts")
    finally:
        output = stop(supervisor)
        levers("down", cwd=root)
    assert supervisor.returncode == 0, output
    assert totals == {b"done": str(SHORT_DOCS + 1).encode()}
    assert long_attempts == "1"
    assert one_line_each_way(output), outage_lines(output)
    assert "the embedded server was gone: started it again" in output


def test_a_server_that_stops_answering_is_an_outage_not_a_hang(
    tmp_path: Path, own_server: OwnServer, start_levers: StartLevers
) -> None:
    """A server that keeps its connections open but answers nothing (its host died, the network
    was cut; here it is stopped with SIGSTOP) is noticed as an outage within seconds (redis-py's
    socket timeout), not waited on for the kernel's 15 minutes while nothing is supervised."""
    root = make_project(tmp_path, long_s=0.1)
    connection = redis.Redis.from_url(own_server.url)
    log = tmp_path / "up.log"
    with log.open("w") as output:
        supervisor = start_levers("up", cwd=root, output=output)
        try:
            wait_until(lambda: len(Worker.all(connection=connection)) == 3)
            assert own_server.process is not None
            own_server.process.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: supervisor_lines(log.read_text())[0] == 1, timeout_s=120)
            finally:
                own_server.process.send_signal(signal.SIGCONT)
            doc_ids = submit(root, "docs")
            wait_until(lambda: done(connection, doc_ids) == SHORT_DOCS + 1, timeout_s=90)
            assert supervisor.poll() is None
        finally:
            stop(supervisor)
    assert supervisor.returncode == 0
    assert supervisor_lines(log.read_text()) == (1, 1)
    assert "Traceback" not in log.read_text()


def test_a_supervisor_that_cannot_go_on_exits_non_zero_and_stops_its_workers(
    tmp_path: Path, own_server: OwnServer, start_levers: StartLevers
) -> None:
    root = make_project(tmp_path, long_s=0)
    connection = redis.Redis.from_url(own_server.url)
    supervisor = start_levers("up", cwd=root)
    try:
        wait_until(lambda: len(Worker.all(connection=connection)) == 3)
        workers = [psutil.Process(w.pid) for w in Worker.all(connection=connection)]
        own_server.kill()
        own_server.start("--requirepass", "changed")  # back, but refusing the credentials levers has

        output, _ = supervisor.communicate(timeout=60)
    finally:
        if supervisor.poll() is None:
            stop(supervisor)
    assert supervisor.returncode == 1, output
    assert f"Redis at 127.0.0.1:{own_server.port} refused the credentials" in output
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
