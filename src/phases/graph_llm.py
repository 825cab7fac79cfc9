"""kg_ingest's LLM mode: graphiti's own extraction (``Graphiti.add_episode``) with Anthropic.

What graphiti 0.31 needs besides a graph driver, and what this module gives it:

- an LLM client: ``LeversAnthropicClient``, graphiti's AnthropicClient on an SDK client whose
  requests go through a ``RequestGate`` (at most ``semaphore`` in flight, through the shared limit
  when one is declared, 429/529 retried honouring retry-after) and never carry ``temperature``;
- an embedder: ``HashingEmbedder``, local and deterministic (feature hashing, no model);
- a cross-encoder: ``LexicalReranker``, local word overlap. add_episode never reranks, but
  Graphiti builds an OpenAI reranker when given none, which fails without an OpenAI key.

So the only network calls are the Messages API requests. Importing this module imports graphiti
and the anthropic SDK (see ``phases.graph_store`` for graphiti's import-time side effects).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

os.environ["GRAPHITI_TELEMETRY_ENABLED"] = "false"  # offline: must precede graphiti's import

import anthropic
from graphiti_core import Graphiti
from graphiti_core.cross_encoder.client import CrossEncoderClient
from graphiti_core.driver.driver import GraphDriver
from graphiti_core.embedder.client import EMBEDDING_DIM, EmbedderClient
from graphiti_core.graphiti import AddEpisodeResults
from graphiti_core.llm_client import LLMConfig
from graphiti_core.llm_client.anthropic_client import AnthropicClient
from graphiti_core.llm_client.errors import RateLimitError
from graphiti_core.nodes import EpisodeType
from graphiti_core.utils.maintenance.graph_data_operations import EPISODE_WINDOW_LEN

from levers import PhaseContext, SharedLimit, is_rate_limited, retry_delay
from phases import graph_store, graph_versions
from phases.graph_plan import GraphPlan, LLMSettings, PlannedEpisode

log = logging.getLogger("levers.phase.kg_ingest")

# Stored on an episode once add_episode has processed it: the digest of the content it processed.
DIGEST_PROPERTY = "levers_digest"
_WORD = re.compile(r"\w+")
# Without a shared limit: retries of a rate-limited request, and the first backoff (doubling).
MAX_RATE_RETRIES = 8
BACKOFF_S = 1.0


class _LocalRetry:
    """``SharedLimit.call`` without Redis: retries 429/529, honouring retry-after, for this job only."""

    def __init__(self, max_retries: int = MAX_RATE_RETRIES, backoff_s: float = BACKOFF_S) -> None:
        self.max_retries = max_retries
        self.backoff_s = backoff_s

    async def call(self, fn: Callable[..., Awaitable[Any]], /, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                return await fn(**kwargs)
            except Exception as exc:
                if not is_rate_limited(exc) or attempt >= self.max_retries:
                    raise
                delay = retry_delay(exc, attempt, self.backoff_s)
            attempt += 1
            log.info("rate limited, retry %d in %.2f s", attempt, delay)
            await asyncio.sleep(delay)


class RequestGate:
    """Every Messages API request of one job: at most ``concurrency`` at once, retried when rate limited.

    The bound is per request, not per episode: one add_episode makes several requests, some of
    them concurrently, so bounding episodes alone would let ``semaphore`` episodes make many more
    requests than ``semaphore``. ``limit`` is the shared limit when pipeline.yaml declares one; its
    ``call`` retries 429/529 (the SDK must not: a retry the limit did not see breaks its count).
    """

    def __init__(self, concurrency: int, limit: SharedLimit | None = None) -> None:
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._retrying: SharedLimit | _LocalRetry = limit if limit is not None else _LocalRetry()

    async def call(self, fn: Callable[..., Awaitable[Any]], /, **kwargs: Any) -> Any:
        async with self._semaphore:
            try:
                return await self._retrying.call(fn, **kwargs)
            except anthropic.APIStatusError as exc:
                if is_rate_limited(exc):
                    # graphiti re-sends any other error twice at once; a rate limit that
                    # outlasted our retries must not be hammered, so it is graphiti's RateLimitError
                    raise RateLimitError(f"still rate limited after retries: {exc}") from exc
                raise


class _GatedMessages:
    """The SDK's ``messages`` resource with ``create`` gated and without ``temperature``."""

    def __init__(self, messages: Any, gate: RequestGate) -> None:
        self._messages = messages
        self._gate = gate

    async def create(self, **kwargs: Any) -> Any:
        # graphiti 0.31 sends its LLMConfig temperature (1.0, the API's own default) on every
        # request. The anthropic SDK 2.x has no such parameter (TypeError) and the API refuses
        # it for some models; omitting it asks for the same default.
        kwargs.pop("temperature", None)
        return await self._gate.call(self._messages.create, **kwargs)


class _GatedAnthropic:
    """What graphiti's AnthropicClient uses of an SDK client: ``messages.create``."""

    def __init__(self, sdk: anthropic.AsyncAnthropic, gate: RequestGate) -> None:
        self.sdk = sdk
        self.messages = _GatedMessages(sdk.messages, gate)


class LeversAnthropicClient(AnthropicClient):
    """graphiti's AnthropicClient on a gated SDK client with SDK retries off (the gate retries)."""

    def __init__(self, settings: LLMSettings, gate: RequestGate) -> None:
        sdk = anthropic.AsyncAnthropic(api_key=settings.api_key, base_url=settings.base_url, max_retries=0)
        config = LLMConfig(api_key=settings.api_key, model=settings.model, small_model=settings.model)
        super().__init__(config, client=_GatedAnthropic(sdk, gate))  # type: ignore[arg-type]
        self.sdk = sdk

    async def close(self) -> None:
        await self.sdk.close()


class HashingEmbedder(EmbedderClient):
    """A local, deterministic stand-in for an embedding model: signed feature hashing.

    Features are the lower-cased words (weight 1) and their character trigrams (weight 0.5), so
    "Redis Queue" and "redis queues" land close. Vectors are L2-normalised, ``dim`` long (graphiti's
    EMBEDDING_DIM, which its search also assumes). Similarity is lexical, not semantic: good enough
    for graphiti's duplicate detection of names and facts, no substitute for a real model.
    """

    def __init__(self, dim: int = EMBEDDING_DIM) -> None:
        self.dim = dim

    async def create(
        self, input_data: str | list[str] | Iterable[int] | Iterable[Iterable[int]]
    ) -> list[float]:
        # graphiti passes [text]; token-id inputs are hashed as their decimal strings
        if isinstance(input_data, str):
            return self.embed(input_data)
        items = list(input_data)
        return self.embed(str(items[0]) if items else "")

    async def create_batch(self, input_data_list: list[str]) -> list[list[float]]:
        return [self.embed(text) for text in input_data_list]

    def embed(self, text: str) -> list[float]:
        vector = [0.0] * self.dim
        for feature, weight in _features(text):
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            number = int.from_bytes(digest, "big")
            vector[number % self.dim] += weight if number >> 63 else -weight
        norm = math.sqrt(sum(x * x for x in vector))
        if norm == 0:
            vector[0] = 1.0  # a unit vector even for empty text: cosine of a zero vector is undefined
            return vector
        return [x / norm for x in vector]


def _features(text: str) -> Iterable[tuple[str, float]]:
    for word in _WORD.findall(text.casefold()):
        yield f"w:{word}", 1.0
        padded = f" {word} "
        for start in range(len(padded) - 2):
            yield f"t:{padded[start : start + 3]}", 0.5


class LexicalReranker(CrossEncoderClient):
    """Ranks passages by the share of the query's words they contain; local and deterministic."""

    async def rank(self, query: str, passages: list[str]) -> list[tuple[str, float]]:
        wanted = set(_WORD.findall(query.casefold()))
        scored = [
            (passage, len(wanted & set(_WORD.findall(passage.casefold()))) / (len(wanted) or 1))
            for passage in passages
        ]
        return sorted(scored, key=lambda pair: pair[1], reverse=True)


async def write(
    driver: GraphDriver, plan: GraphPlan, settings: LLMSettings, limit: SharedLimit | None, ctx: PhaseContext
) -> tuple[dict[str, int], graph_versions.Saved]:
    """Extract the plan's new and changed episodes with graphiti, every request through ``limit``
    (when not None); delete the plan's removed episodes and, for a new version of a name, what
    older versions wrote (``phases.graph_versions``).

    Returns how many episodes were extracted and the distinct entities and edges they yielded,
    and what the graph held of the document's other versions.
    """
    before = await _replace_versions(driver, plan)
    if before.superseded:
        return {"extracted": 0, "entities": 0, "edges": 0}, before
    gate = RequestGate(ctx.levers.semaphore, limit)
    llm = LeversAnthropicClient(settings, gate)
    graphiti = Graphiti(
        graph_driver=driver, llm_client=llm, embedder=HashingEmbedder(), cross_encoder=LexicalReranker(),
        max_coroutines=ctx.levers.semaphore,
    )  # fmt: skip
    try:
        uuids = [episode.uuid for episode in plan.episodes]
        digests = await graph_store.episode_properties(driver, uuids, DIGEST_PROPERTY)
        await graph_store.remove_stale(driver, plan)
        todo = [e for e in plan.episodes if digests.get(e.uuid) != content_digest(e)]
        # add_episode(uuid=...) reads the episode from the graph, so it is saved first (with its
        # new content if it changed); saving also clears the digest until extraction succeeds
        now = datetime.now(UTC)
        await ctx.gather(*(node.save(driver) for node in graph_store.episode_nodes(plan, todo, now)))
        await graph_versions.tag(driver, plan)
        previous = _previous_episodes(plan)

        async def extract(episode: PlannedEpisode) -> AddEpisodeResults:
            return await _extract(graphiti, driver, plan, episode, previous[episode.uuid])

        results = await ctx.map(extract, todo)
    finally:
        await llm.close()
    await graph_versions.tag(driver, plan)  # graphiti's saves during extraction dropped the tags
    # a version submitted after this one may have been written meanwhile, or an older one
    after = await _replace_versions(driver, plan)
    found = replace(after, older=[*before.older, *after.older])
    extracted = {
        "extracted": len(todo),
        "entities": len({node.uuid for result in results for node in result.nodes}),
        "edges": len({edge.uuid for result in results for edge in [*result.edges, *result.episodic_edges]}),
    }
    return extracted, found


async def _replace_versions(driver: GraphDriver, plan: GraphPlan) -> graph_versions.Saved:
    """Remove what older versions of the plan's name wrote (unless kept) or, when a newer version
    replaced it, what the plan's document wrote; before extraction (so the graph does not answer
    from a superseded text meanwhile) and after it (what was written in between)."""
    async with graph_versions.name_lock(driver, plan):
        found = await graph_versions.saved(driver, plan)
        await graph_versions.remove(driver, found.own if found.superseded else found.older)
    return found


async def _extract(
    graphiti: Graphiti, driver: GraphDriver, plan: GraphPlan, episode: PlannedEpisode, previous: list[str]
) -> AddEpisodeResults:
    result = await graphiti.add_episode(
        name=episode.name,
        episode_body=episode.content,
        source_description=plan.source,
        reference_time=datetime.now(UTC),
        source=EpisodeType.text,
        group_id=plan.group_id,
        uuid=episode.uuid,
        previous_episode_uuids=previous,
    )
    # last: an episode whose extraction failed part way keeps no digest and is extracted again
    await graph_store.set_episode_property(driver, episode.uuid, DIGEST_PROPERTY, content_digest(episode))
    return result


def _previous_episodes(plan: GraphPlan) -> dict[str, list[str]]:
    """Each episode's context for extraction: the chunks just before it in the same document.

    Explicit, rather than graphiti's default (the group's latest episodes by time), so that the
    context does not depend on which other documents happened to be ingested at the same time.
    """
    uuids = [episode.uuid for episode in plan.episodes]
    return {uuid: uuids[max(0, i - EPISODE_WINDOW_LEN) : i] for i, uuid in enumerate(uuids)}


def content_digest(episode: PlannedEpisode) -> str:
    return hashlib.sha256(episode.content.encode()).hexdigest()[:32]
