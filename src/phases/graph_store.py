"""The knowledge graph in FalkorDB, written and read through graphiti-core with no LLM or embedder.

Nodes and edges have graphiti's labels and properties (Episodic, Entity, MENTIONS, RELATES_TO), so
graphiti's BM25 fulltext search works on them and the LLM mode (``phases.graph_llm``, graphiti's
own extraction) reads and extends the same graph. Offline, a document is written in one query of
its own rather than through graphiti's per-object saves (a round trip each). Embeddings are left
unset; graphiti's fulltext search does not use them. An offline fact (RELATES_TO named
MENTIONED_WITH) is one edge per pair of entities: ``weight`` counts the documents that state it,
``episodes`` lists the first ``MAX_FACT_EPISODES`` chunks that do.

Importing this module imports graphiti, which takes one to two seconds; ``kg_ingest`` imports
it only when it needs the graph. At import graphiti calls python-dotenv's ``load_dotenv()``,
which reads the first ``.env`` found walking up from graphiti's installed location (from the
working directory under a debugger or REPL) without overriding variables already set; and it
sends usage telemetry unless GRAPHITI_TELEMETRY_ENABLED is false, which is set here first.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

os.environ["GRAPHITI_TELEMETRY_ENABLED"] = "false"  # offline: must precede graphiti's import

from falkordb.asyncio import FalkorDB
from graphiti_core.driver.falkordb_driver import FalkorDriver, _strip_nul_bytes
from graphiti_core.nodes import EpisodeType, EpisodicNode
from graphiti_core.search.search_filters import SearchFilters
from graphiti_core.search.search_utils import edge_fulltext_search, episode_fulltext_search

if TYPE_CHECKING:
    from phases.graph_plan import GraphPlan, PlannedEpisode

RELATION_NAME = "MENTIONED_WITH"
# The episodes an offline fact lists (graphiti's EntityEdge.episodes): where it is stated, the
# first ones only, so a fact that thousands of documents state stays small.
MAX_FACT_EPISODES = 10
# A document's episodes are found by their source (see ``write``); graphiti indexes it for
# fulltext search only, which an equality lookup does not use.
_SOURCE_INDEX = "CREATE INDEX FOR (n:Episodic) ON (n.source_description)"

# (server url, graph) pairs whose indices this process has built: graphiti's index creation is
# idempotent but costs a round trip per index, so it runs once per graph per process.
_INDEXED: set[tuple[str, str]] = set()


@asynccontextmanager
async def connect(url: str, group_id: str) -> AsyncIterator[FalkorDriver]:
    """A driver on graph ``group_id`` at ``url``, its indices built, closed on exit."""
    # Built on a thread: FalkorDB's client makes a blocking call (cluster detection) when created,
    # and FalkorDriver schedules an index build of its own when created inside a running loop,
    # which would defeat the once-per-graph build below.
    driver = await asyncio.to_thread(_new_driver, url, group_id)
    try:
        if (url, group_id) not in _INDEXED:
            await driver.build_indices_and_constraints()
            await driver.execute_query(_SOURCE_INDEX)  # FalkorDriver ignores "already indexed"
            _INDEXED.add((url, group_id))
        yield driver
    finally:
        await driver.close()


def _new_driver(url: str, group_id: str) -> FalkorDriver:
    # database= names the graph; without it graphiti clones a driver per group id.
    return FalkorDriver(falkor_db=FalkorDB.from_url(url), database=group_id)


async def graph_exists(url: str, group_id: str) -> bool:
    client = await asyncio.to_thread(FalkorDB.from_url, url)
    try:
        return group_id in await client.list_graphs()
    finally:
        await client.aclose()


async def write(driver: FalkorDriver, plan: GraphPlan) -> None:
    """Save one document's plan, replacing what an earlier version of it wrote.

    One read (the document's episodes as saved, found through an index) and one write query, so
    the cost of a document does not depend on how large the graph is, and a worker that dies
    between the two leaves the graph as it was: the write is applied whole or not at all.
    Writing the same plan twice changes nothing.
    """
    previous = await _saved_episodes(driver, plan)
    await driver.execute_query(_WRITE, **_write_parameters(plan, previous, datetime.now(UTC)))


async def write_many(driver: FalkorDriver, plans: Sequence[GraphPlan]) -> list[Exception | None]:
    """``write`` for several documents (of one graph, each once) in two round trips: one read
    query for all their saved episodes, then each document's write query, in order, in one
    transaction (MULTI/EXEC). Each write is applied whole or not at all, and one that fails (its
    error in its place, None for the others) leaves the others applied."""
    if not plans:
        return []
    records, _, _ = await driver.execute_query(
        "MATCH (e:Episodic) WHERE e.source_description IN $sources "
        "RETURN e.source_description AS source, e.uuid AS uuid, e.entity_edges AS edges",
        sources=[plan.source for plan in plans],
    )
    previous: dict[str, dict[str, list[str]]] = {plan.source: {} for plan in plans}
    for record in records:
        previous[record["source"]][record["uuid"]] = list(record["edges"] or [])
    # graphiti's driver has no transaction of several queries: they go on its client's connection,
    # built as its own queries are (parameters header, NUL bytes stripped)
    graph = driver._get_graph(None)
    now = datetime.now(UTC)
    async with driver.client.connection.pipeline(transaction=True) as pipe:
        for plan in plans:
            parameters = _strip_nul_bytes(_write_parameters(plan, previous[plan.source], now))
            query = graph._build_params_header(parameters) + _WRITE
            pipe.execute_command("GRAPH.QUERY", graph.name, query)
        replies = await pipe.execute(raise_on_error=False)
    return [reply if isinstance(reply, Exception) else None for reply in replies]


async def _saved_episodes(driver: FalkorDriver, plan: GraphPlan) -> dict[str, list[str]]:
    """The document's saved episodes, each with the facts it stated (its ``entity_edges``)."""
    records, _, _ = await driver.execute_query(
        "MATCH (e:Episodic) WHERE e.source_description = $source "
        "RETURN e.uuid AS uuid, e.entity_edges AS edges",
        source=plan.source,
    )
    return {record["uuid"]: list(record["edges"] or []) for record in records}


def _write_parameters(plan: GraphPlan, previous: Mapping[str, list[str]], now: datetime) -> dict[str, Any]:
    """The write query's parameters: what to add, and what the document's previous version
    stated that this one does not (its facts lose this document's weight)."""
    stamp = now.isoformat()
    kept = {episode.uuid for episode in plan.episodes}
    stated = {uuid for uuids in previous.values() for uuid in uuids}
    relations = [
        {"uuid": r.uuid, "source": r.source, "target": r.target, "fact": r.fact,
         "episodes": r.episodes[:MAX_FACT_EPISODES], "delta": 0 if r.uuid in stated else 1}
        for r in plan.relations
    ]  # fmt: skip
    return {
        "group_id": plan.group_id,
        "now": stamp,
        "name": RELATION_NAME,
        "max_episodes": MAX_FACT_EPISODES,
        "gone": [uuid for uuid in previous if uuid not in kept],
        "released": sorted(stated - {r.uuid for r in plan.relations}),
        "document_episodes": sorted(kept | set(previous)),
        "episodes": _episode_rows(plan, stamp),
        "entities": [{"uuid": e.uuid, "name": e.name} for e in plan.entities],
        "mentions": [{"uuid": m.uuid, "episode": m.episode, "entity": m.entity} for m in plan.mentions],
        "mention_uuids": [m.uuid for m in plan.mentions],
        "relations": relations,
    }


def _episode_rows(plan: GraphPlan, stamp: str) -> list[dict[str, Any]]:
    """The plan's episodes as graphiti saves them, each listing the facts it states."""
    edge_uuids_by_episode: dict[str, list[str]] = {}
    for relation in plan.relations:
        for episode_uuid in relation.episodes:
            edge_uuids_by_episode.setdefault(episode_uuid, []).append(relation.uuid)
    return [
        {"uuid": e.uuid, "name": e.name, "group_id": plan.group_id, "source_description": plan.source,
         "source": EpisodeType.text.value, "content": e.content,
         "entity_edges": edge_uuids_by_episode.get(e.uuid, []), "created_at": stamp, "valid_at": stamp}
        for e in plan.episodes
    ]  # fmt: skip


# One document's write, in one query (so applied whole or not at all). Every lookup goes through an
# index on uuid; a fact is one edge per pair of entities, so MERGE expands only the edges between
# two nodes, never a hub's. Statements are chained with an aggregate, which yields a row even
# when the list before it was empty.
_WRITE = "\nWITH count(*) AS _\n".join(
    [
        # the episodes the document no longer has, with their MENTIONS
        "UNWIND $gone AS uuid MATCH (e:Episodic) WHERE e.uuid = uuid DETACH DELETE e",
        # facts the document no longer states: one document less; gone once none states them
        "UNWIND $released AS uuid MATCH ()-[r:RELATES_TO]->() WHERE r.uuid = uuid "
        "SET r.weight = coalesce(r.weight, 1) - 1, "
        "r.episodes = [x IN coalesce(r.episodes, []) WHERE NOT x IN $document_episodes]",
        # (a statement of its own: FalkorDB drops the SET above when `WITH r WHERE r.weight <= 0
        # DELETE r` follows it)
        "UNWIND $released AS uuid MATCH ()-[r:RELATES_TO]->() WHERE r.uuid = uuid AND r.weight <= 0 DELETE r",
        "UNWIND $episodes AS ep MERGE (e:Episodic {uuid: ep.uuid}) SET e = ep "
        "WITH e MATCH (e)-[m:MENTIONS]->(:Entity) WHERE NOT m.uuid IN $mention_uuids DELETE m",
        # an entity keeps what it was created with (or what graphiti's LLM mode gave it)
        "UNWIND $entities AS en MERGE (n:Entity {uuid: en.uuid}) "
        "ON CREATE SET n.name = en.name, n.group_id = $group_id, n.summary = '', n.created_at = $now",
        "UNWIND $mentions AS me MATCH (e:Episodic {uuid: me.episode}) MATCH (n:Entity {uuid: me.entity}) "
        "MERGE (e)-[m:MENTIONS {uuid: me.uuid}]->(n) "
        "ON CREATE SET m.group_id = $group_id, m.created_at = $now",
        "UNWIND $relations AS re MATCH (a:Entity {uuid: re.source}) MATCH (b:Entity {uuid: re.target}) "
        "MERGE (a)-[r:RELATES_TO {uuid: re.uuid}]->(b) "
        "ON CREATE SET r.name = $name, r.group_id = $group_id, r.fact = re.fact, r.episodes = re.episodes, "
        "r.created_at = $now, r.weight = 1 "
        "ON MATCH SET r.weight = coalesce(r.weight, 0) + re.delta, "
        # graph_plan.fact_order: the shortest sentence, then the first alphabetically
        "r.fact = CASE WHEN size(re.fact) < size(r.fact) "
        "OR (size(re.fact) = size(r.fact) AND re.fact < r.fact) THEN re.fact ELSE r.fact END, "
        "r.episodes = ([x IN coalesce(r.episodes, []) WHERE NOT x IN $gone] "
        "+ [x IN re.episodes WHERE NOT x IN coalesce(r.episodes, [])])[0..$max_episodes]",
    ]
)


def episode_nodes(plan: GraphPlan, planned: Iterable[PlannedEpisode], now: datetime) -> list[EpisodicNode]:
    """graphiti's nodes for ``planned`` episodes of ``plan``, tagged with the plan's source."""
    return [
        EpisodicNode(
            uuid=episode.uuid,
            name=episode.name,
            group_id=plan.group_id,
            source=EpisodeType.text,
            source_description=plan.source,
            content=episode.content,
            valid_at=now,
            created_at=now,
        )
        for episode in planned
    ]


async def remove_stale(driver: FalkorDriver, plan: GraphPlan) -> None:
    """Delete the document's episodes that this version no longer has (found through an index).

    Entities stay: other documents may mention them, and deleting one here could race another
    worker that is about to link to it.
    """
    await driver.execute_query(
        "MATCH (e:Episodic) WHERE e.source_description = $source AND NOT e.uuid IN $keep DETACH DELETE e",
        source=plan.source,
        keep=[episode.uuid for episode in plan.episodes],
    )


async def episode_properties(driver: FalkorDriver, uuids: list[str], name: str) -> dict[str, Any]:
    """Property ``name`` of each existing episode among ``uuids`` (None where unset).

    ``name`` is spliced into the query (Cypher takes no property key as a parameter): callers pass
    constants of their own, never input.
    """
    records, _, _ = await driver.execute_query(
        f"MATCH (e:Episodic) WHERE e.uuid IN $uuids RETURN e.uuid AS uuid, e.{name} AS value", uuids=uuids
    )
    return {record["uuid"]: record["value"] for record in records}


async def set_episode_property(driver: FalkorDriver, uuid: str, name: str, value: Any) -> None:
    query = f"MATCH (e:Episodic {{uuid: $uuid}}) SET e.{name} = $value"
    await driver.execute_query(query, uuid=uuid, value=value)


async def search(driver: FalkorDriver, group_id: str, query: str, limit: int) -> list[dict[str, Any]]:
    """Episodes and facts matching ``query`` by BM25, interleaved best first, at most ``limit``."""
    facts = await edge_fulltext_search(driver, query, SearchFilters(), [group_id], limit)
    episodes = await episode_fulltext_search(driver, query, SearchFilters(), [group_id], limit)
    fact_rows = [
        {"kind": "fact", "uuid": edge.uuid, "text": edge.fact, "name": edge.name, "episodes": edge.episodes,
         # offline facts: how many documents state it (None for facts graphiti's LLM mode wrote)
         "weight": edge.attributes.get("weight")}
        for edge in facts
    ]  # fmt: skip
    episode_rows = [
        {"kind": "episode", "uuid": node.uuid, "text": node.content, "name": node.name,
         "source": node.source_description}
        for node in episodes
    ]  # fmt: skip
    merged: list[dict[str, Any]] = []
    for index in range(max(len(fact_rows), len(episode_rows))):
        merged.extend(rows[index] for rows in (episode_rows, fact_rows) if index < len(rows))
    return merged[:limit]


async def counts(driver: FalkorDriver, group_id: str) -> dict[str, int]:
    """Episodes, entities and edges (MENTIONS and RELATES_TO) in graph ``group_id``."""
    queries = {
        "episodes": "MATCH (n:Episodic {group_id: $group_id}) RETURN count(n) AS n",
        "entities": "MATCH (n:Entity {group_id: $group_id}) RETURN count(n) AS n",
        "edges": "MATCH ()-[r]->() WHERE r.group_id = $group_id RETURN count(r) AS n",
    }
    result = {}
    for key, query in queries.items():
        records, _, _ = await driver.execute_query(query, group_id=group_id)
        result[key] = int(records[0]["n"])
    return result
