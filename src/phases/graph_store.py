"""The knowledge graph in FalkorDB, written and read through graphiti-core with no LLM or embedder.

Nodes and edges are saved with graphiti's own models (EpisodicNode, EntityNode, EpisodicEdge,
EntityEdge), so graphiti's BM25 fulltext search works on them and the LLM mode
(``phases.graph_llm``, graphiti's own extraction) reads and extends the same graph. Here
embeddings are left unset: graphiti stores None as null (FalkorDB's ``vecf32`` passes null
through) and its fulltext search does not use them.

Importing this module imports graphiti, which takes one to two seconds; ``kg_ingest`` imports
it only when it needs the graph. At import graphiti calls python-dotenv's ``load_dotenv()``,
which reads the first ``.env`` found walking up from graphiti's installed location (from the
working directory under a debugger or REPL) without overriding variables already set; and it
sends usage telemetry unless GRAPHITI_TELEMETRY_ENABLED is false, which is set here first.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

os.environ["GRAPHITI_TELEMETRY_ENABLED"] = "false"  # offline: must precede graphiti's import

from falkordb.asyncio import FalkorDB
from graphiti_core.driver.falkordb_driver import FalkorDriver
from graphiti_core.edges import EntityEdge, EpisodicEdge
from graphiti_core.nodes import EntityNode, EpisodeType, EpisodicNode
from graphiti_core.search.search_filters import SearchFilters
from graphiti_core.search.search_utils import edge_fulltext_search, episode_fulltext_search

if TYPE_CHECKING:
    from phases.graph_plan import GraphPlan, PlannedEpisode

RELATION_NAME = "MENTIONED_WITH"

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


async def write(driver: FalkorDriver, plan: GraphPlan, gather: Callable[..., Awaitable[list[Any]]]) -> None:
    """Save one document's plan, replacing what an earlier version of it wrote.

    Saves are MERGEs on uuid, so writing the same plan twice changes nothing. ``gather`` bounds
    how many saves run at once. Nodes go first: edges MATCH their endpoints.
    """
    now = datetime.now(UTC)
    edge_uuids_by_episode: dict[str, list[str]] = {}
    for relation in plan.relations:
        for episode_uuid in relation.episodes:
            edge_uuids_by_episode.setdefault(episode_uuid, []).append(relation.uuid)
    episodes = episode_nodes(plan, plan.episodes, now, edge_uuids_by_episode)
    entities = [
        EntityNode(uuid=entity.uuid, name=entity.name, group_id=plan.group_id, created_at=now)
        for entity in plan.entities
    ]
    await remove_stale(driver, plan)
    await gather(*(node.save(driver) for node in [*episodes, *entities]))
    await gather(*(edge.save(driver) for edge in _edges(plan, now)))


def episode_nodes(
    plan: GraphPlan,
    planned: Iterable[PlannedEpisode],
    now: datetime,
    edge_uuids_by_episode: Mapping[str, list[str]] | None = None,
) -> list[EpisodicNode]:
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
            entity_edges=(edge_uuids_by_episode or {}).get(episode.uuid, []),
        )
        for episode in planned
    ]


def _edges(plan: GraphPlan, now: datetime) -> Iterable[EpisodicEdge | EntityEdge]:
    for mention in plan.mentions:
        yield EpisodicEdge(
            uuid=mention.uuid,
            group_id=plan.group_id,
            source_node_uuid=mention.episode,
            target_node_uuid=mention.entity,
            created_at=now,
        )
    for relation in plan.relations:
        yield EntityEdge(
            uuid=relation.uuid,
            group_id=plan.group_id,
            source_node_uuid=relation.source,
            target_node_uuid=relation.target,
            created_at=now,
            name=RELATION_NAME,
            fact=relation.fact,
            episodes=relation.episodes,
            # lets a re-ingest of a changed document find the facts its old version stated
            attributes={"document_id": plan.document_id},
        )


async def remove_stale(driver: FalkorDriver, plan: GraphPlan) -> None:
    """Delete the document's episodes and facts that this version no longer has.

    Entities stay: other documents may mention them, and deleting one here could race another
    worker that is about to link to it.
    """
    await driver.execute_query(
        "MATCH (e:Episodic {group_id: $group_id, source_description: $source}) "
        "WHERE NOT e.uuid IN $keep DETACH DELETE e",
        group_id=plan.group_id,
        source=plan.source,
        keep=[episode.uuid for episode in plan.episodes],
    )
    await driver.execute_query(
        "MATCH (:Entity)-[r:RELATES_TO {group_id: $group_id, document_id: $document_id}]->(:Entity) "
        "WHERE NOT r.uuid IN $keep DELETE r",
        group_id=plan.group_id,
        document_id=plan.document_id,
        keep=[relation.uuid for relation in plan.relations],
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
        {"kind": "fact", "uuid": edge.uuid, "text": edge.fact, "name": edge.name, "episodes": edge.episodes}
        for edge in facts
    ]
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
