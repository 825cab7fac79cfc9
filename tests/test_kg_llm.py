"""kg_ingest's LLM mode end to end: the real graphiti and anthropic SDK, the fake Anthropic API, a
real embedded FalkorDB. The fake answers graphiti's extraction tools with canned entities and a
fact, so what reaches the graph is known."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import pytest
import redis

from levers.documents.versions import DocumentVersion
from levers.limits.shared import JobLimits, UnknownLimit
from levers.limits.status import limits_status
from levers.pipeline.model import LimitSettings, Phase, Pipeline
from levers.pipeline.outline import outline_of
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.graph_plan import LLMSettings
from phases.kg_ingest import (
    Options,
    counts,
    ingest_graph,
    llm_settings,
    search,
)
from tests.fake_anthropic import FakeAnthropic

MODEL = "claude-fake-1"
ENTITIES = {"extracted_entities": [{"name": "Redis Queue", "entity_type_id": 0},
                                   {"name": "PDF Parser", "entity_type_id": 0}]}  # fmt: skip
FACT = "The Redis Queue feeds the PDF Parser."
EDGES = {"edges": [{"source_entity_name": "Redis Queue", "target_entity_name": "PDF Parser",
                    "relation_type": "FEEDS", "fact": FACT}]}  # fmt: skip
TEXTS = [
    "The Redis Queue feeds the PDF Parser. Workers wait.",
    "Each PDF Parser reads files that the Redis Queue names.",
    "The Redis Queue keeps one entry per document.",
]


@pytest.fixture(scope="module")
def state_dir(graph_state_dir: Path) -> Path:
    return graph_state_dir


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeAnthropic]:
    monkeypatch.delenv("FALKORDB_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    with FakeAnthropic(latency_s=0.05) as server:
        server.tool_inputs.update(ExtractedEntities=ENTITIES, ExtractedEdges=EDGES)
        yield server


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as pool:
        yield pool


def chunks(texts: list[str]) -> dict[str, Any]:
    return {"chunks": [{"index": i, "context": "From 'Ops'.", "text": text} for i, text in enumerate(texts)]}


def context(state_dir: Path, executor: ThreadPoolExecutor, semaphore: int = 1, limits: Any = None,
            **options: Any) -> PhaseContext:  # fmt: skip
    options = Options(**{"model": MODEL, **options})
    return PhaseContext("kg_ingest", Levers(1, semaphore, 2), options, state_dir, executor, limits)


def pipeline(**limits: LimitSettings) -> Pipeline:
    phase = Phase(handler="phases.kg_ingest:ingest_graph", accepts=["*"])
    return Pipeline(name="kg-llm", phases={"kg": phase}, limits=limits)


def ingest(doc_id: str, texts: list[str], ctx: PhaseContext) -> dict[str, Any]:
    return asyncio.run(ingest_graph(Document(doc_id, f"{doc_id}.md", b"", input=chunks(texts)), ctx))


def test_add_episode_builds_the_graph_from_the_llm_and_reingests_idempotently(
    fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    ctx = context(state_dir, executor, group_id="llm", anthropic_base_url=fake.url)
    first = ingest("ops", TEXTS, ctx)

    # one at a time (semaphore 1), each episode finds the entities and the fact the earlier saved
    assert first == {"group_id": "llm", "llm": MODEL, "episodes": 3, "extracted": 3, "entities": 2,
                     "edges": 7}  # fmt: skip
    assert counts(state_dir, "llm") == {"episodes": 3, "entities": 2, "edges": 7}  # 1 fact, 6 mentions
    [fact] = [r for r in search("Redis Queue feeds", state_dir, "llm") if r["kind"] == "fact"]
    assert (fact["name"], fact["text"], len(fact["episodes"])) == ("FEEDS", FACT, 3)
    tools = {r.body["tool_choice"]["name"] for r in fake.requests}
    assert {"ExtractedEntities", "ExtractedEdges"} <= tools
    assert all(r.body["model"] == MODEL for r in fake.requests)
    sent = len(fake.requests)

    again = ingest("ops", TEXTS, ctx)
    assert again == {**first, "extracted": 0, "entities": 0, "edges": 0}
    assert len(fake.requests) == sent, "nothing is extracted twice"
    assert counts(state_dir, "llm") == {"episodes": 3, "entities": 2, "edges": 7}

    changed = ingest("ops", [TEXTS[0], "The PDF Parser now reads from the Redis Queue."], ctx)
    assert (changed["episodes"], changed["extracted"]) == (2, 1), "only the changed chunk is extracted"
    assert counts(state_dir, "llm")["episodes"] == 2, "the removed chunk's episode is gone"


def test_a_new_version_replaces_what_graphiti_extracted_from_the_old_one(
    fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    ctx = context(state_dir, executor, group_id="llm_versions", anthropic_base_url=fake.url)

    def version(doc_id: str, texts: list[str], number: int) -> dict[str, Any]:
        doc = Document(doc_id, "ops.md", b"", input=chunks(texts), version=DocumentVersion("/ops.md", number))
        return asyncio.run(ingest_graph(doc, ctx))

    version("old", TEXTS, 1)
    assert any("Workers wait" in r["text"] for r in search("Workers wait", state_dir, "llm_versions"))
    changed = ["The Redis Queue hands each PDF Parser one file."]

    assert version("new", changed, 2)["replaced"] == ["old"]

    assert not any("Workers" in r["text"] for r in search("Workers wait", state_dir, "llm_versions"))
    [fact] = [r for r in search("Redis Queue feeds", state_dir, "llm_versions") if r["kind"] == "fact"]
    assert len(fact["episodes"]) == 1, "the fact lists the new version's episode alone"
    ingest("new", changed, context(state_dir, executor, group_id="llm_alone", anthropic_base_url=fake.url))
    assert counts(state_dir, "llm_versions") == counts(state_dir, "llm_alone")
    assert version("old", TEXTS, 1) == {
        "group_id": "llm_versions", "episodes": 0, "entities": 0, "edges": 0, "superseded": True
    }, "an older version that finishes last writes nothing"  # fmt: skip
    assert counts(state_dir, "llm_versions") == counts(state_dir, "llm_alone")


def test_requests_carry_no_temperature_which_the_sdk_rejects(
    fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    from graphiti_core.llm_client import LLMConfig
    from graphiti_core.llm_client.anthropic_client import AnthropicClient
    from graphiti_core.prompts.models import Message

    # graphiti's own client passes temperature=..., which this SDK has no parameter for
    create = anthropic.resources.messages.AsyncMessages.create
    assert "temperature" not in inspect.signature(create).parameters
    sdk = anthropic.AsyncAnthropic(base_url=fake.url, api_key="k", max_retries=0)
    plain = AnthropicClient(LLMConfig(api_key="k", model=MODEL), client=sdk)
    messages = [Message(role="system", content="s"), Message(role="user", content="u")]
    with pytest.raises(TypeError, match="temperature"):
        asyncio.run(plain.generate_response(messages))
    assert fake.requests == []

    ingest(
        "temp", TEXTS[:1], context(state_dir, executor, group_id="temperature", anthropic_base_url=fake.url)
    )
    assert fake.requests and not any("temperature" in r.body for r in fake.requests)


def test_requests_in_flight_never_exceed_the_semaphore(
    fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake.url)  # the SDK's own way to find the endpoint
    texts = [f"The Redis Queue feeds the PDF Parser number {n}." for n in range(6)]
    result = ingest("wide", texts, context(state_dir, executor, semaphore=2, group_id="concurrent"))

    assert result["extracted"] == 6
    assert fake.peak_in_flight == 2, "episodes overlap, up to the semaphore and no further"


def test_a_429_with_retry_after_is_retried_not_failed(
    fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor
) -> None:
    fake.fail_next(1, status=429, retry_after=0.3)
    fake.fail_next(1, status=529, retry_after=0.2)
    started = time.monotonic()
    ctx = context(state_dir, executor, group_id="rate_limited", anthropic_base_url=fake.url)
    result = ingest("busy", TEXTS[:1], ctx)

    assert result["extracted"] == 1 and result["entities"] == 2
    assert time.monotonic() - started >= 0.5, "the retries waited as retry-after asked"
    first, second, third = fake.requests[:3]
    assert first.body == second.body == third.body, "the same request was sent again, by us, not by graphiti"


def test_requests_go_through_the_shared_limit_when_declared(
    fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor, redis_url: str
) -> None:
    spec = pipeline(anthropic=LimitSettings(concurrency=1))
    fake.fail_next(1, status=429, retry_after=0.1)

    async def run() -> dict[str, Any]:
        limits = JobLimits(spec, redis_url)
        try:
            ctx = context(
                state_dir, executor, 3, limits, group_id="shared_limit", anthropic_base_url=fake.url
            )
            return await ingest_graph(Document("lim", "lim.md", b"", input=chunks(TEXTS)), ctx)
        finally:
            await limits.aclose()

    assert asyncio.run(run())["extracted"] == 3
    with redis.Redis.from_url(redis_url) as connection:
        status = limits_status(connection, outline_of(spec), "anthropic")
    assert (status["calls"], status["rate_limited"]) == (len(fake.requests), 1)
    assert fake.peak_in_flight == 1, "the limit's concurrency 1 binds below the semaphore of 3"


def test_a_named_limit_must_be_declared(fake: FakeAnthropic, state_dir: Path, executor: ThreadPoolExecutor,
                                        redis_url: str) -> None:  # fmt: skip
    spec = pipeline()

    async def run() -> None:
        limits = JobLimits(spec, redis_url)
        try:
            ctx = context(
                state_dir, executor, 1, limits, group_id="named", anthropic_base_url=fake.url, limit="claude"
            )
            await ingest_graph(Document("n", "n.md", b"", input=chunks(TEXTS[:1])), ctx)
        finally:
            await limits.aclose()

    with pytest.raises(UnknownLimit, match="claude"):
        asyncio.run(run())
    assert fake.requests == []


@pytest.mark.parametrize(
    ("options", "environ", "expected"),
    [
        ({}, {}, None),
        ({}, {"ANTHROPIC_API_KEY": "k"}, LLMSettings("claude-haiku-4-5", None, "k")),
        ({"llm": "none"}, {"ANTHROPIC_API_KEY": "k"}, None),
        (
            {"llm": "anthropic", "model": "m", "anthropic_base_url": "http://x"},
            {},
            LLMSettings("m", "http://x", None),
        ),
    ],
)
def test_llm_option(options: dict[str, Any], environ: dict[str, str], expected: LLMSettings | None) -> None:
    assert llm_settings(Options(**options), environ) == expected


def test_hashing_embedder_is_deterministic_unit_length_and_lexical() -> None:
    from phases.graph_llm import HashingEmbedder

    embedder = HashingEmbedder(dim=256)
    names = ("Redis Queue", "Redis Queue", "redis queues", "PDF Parser")
    one, same, near, far = (embedder.embed(name) for name in names)

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert one == same and len(one) == 256
    assert abs(cosine(one, one) - 1) < 1e-9
    assert cosine(one, near) > 0.5 > cosine(one, far)
    assert asyncio.run(embedder.create(["Redis Queue"])) == one
    assert asyncio.run(embedder.create_batch(["Redis Queue", "PDF Parser"])) == [one, far]
