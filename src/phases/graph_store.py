"""The knowledge graph in FalkorDB or Neo4j, written and read through graphiti-core with no LLM or
embedder.

Nodes and edges have graphiti's labels and properties (Episodic, Entity, MENTIONS, RELATES_TO), so
graphiti's BM25 fulltext search works on them and the LLM mode (``phases.graph_llm``, graphiti's
own extraction) reads and extends the same graph. Offline, a document is written in one query of
its own rather than through graphiti's per-object saves (a round trip each). Embeddings are left
unset; graphiti's fulltext search does not use them. An offline fact (RELATES_TO named
MENTIONED_WITH) is one edge per pair of entities: ``weight`` counts the documents that state it,
``episodes`` lists the first ``MAX_FACT_EPISODES`` chunks that do.

The database is the one the URL names (``phases.graph_db``), through graphiti's own driver for it:
in FalkorDB each group id is a graph of its own; in Neo4j every group shares one database and
is told apart by its nodes' and edges' ``group_id``, which every query here filters on.

Importing this module imports graphiti, which takes one to two seconds; ``kg_ingest`` imports
it only when it needs the graph. At import graphiti calls python-dotenv's ``load_dotenv()``,
which reads the first ``.env`` found walking up from graphiti's installed location (from the
working directory under a debugger or REPL) without overriding variables already set; and it
sends usage telemetry unless GRAPHITI_TELEMETRY_ENABLED is false, which is set here first.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

os.environ["GRAPHITI_TELEMETRY_ENABLED"] = "false"  # offline: must precede graphiti's import

import neo4j.exceptions
import redis.exceptions
from falkordb.asyncio import FalkorDB
from graphiti_core.driver.driver import GraphDriver, GraphProvider
from graphiti_core.driver.falkordb_driver import FalkorDriver
from graphiti_core.driver.neo4j_driver import Neo4jDriver
from graphiti_core.nodes import EpisodeType, EpisodicNode
from graphiti_core.search.search_filters import SearchFilters
from graphiti_core.search.search_utils import edge_fulltext_search, episode_fulltext_search

from levers import ConnectionFailed, masked
from phases import graph_db, graph_versions
from phases.graph_versions import ORPHANS, Saved, SavedEpisode

if TYPE_CHECKING:
    from phases.graph_plan import GraphPlan, PlannedEpisode

RELATION_NAME = "MENTIONED_WITH"
# The episodes an offline fact lists (graphiti's EntityEdge.episodes): where it is stated, the
# first ones only, so a fact that thousands of documents state stays small.
MAX_FACT_EPISODES = 10
# A document's episodes are found by their source (see ``write``); graphiti indexes it for
# fulltext search only, which an equality lookup does not use. (FalkorDB has no IF NOT EXISTS;
# its driver ignores "already indexed".)
_SOURCE_INDEX = {
    GraphProvider.FALKORDB: "CREATE INDEX FOR (n:Episodic) ON (n.source_description)",
    GraphProvider.NEO4J: "CREATE INDEX episode_source IF NOT EXISTS "
    "FOR (n:Episodic) ON (n.source_description)",
}
_VERSION_INDEX = {
    GraphProvider.FALKORDB: f"CREATE INDEX FOR (n:Episodic) ON (n.{graph_versions.VERSION_OF})",
    GraphProvider.NEO4J: "CREATE INDEX episode_version_of IF NOT EXISTS "
    f"FOR (n:Episodic) ON (n.{graph_versions.VERSION_OF})",
}
# A server that does not answer within this long is reported (a worker's job is retried later).
CONNECT_TIMEOUT_S = 10
# The client libraries' errors for a database that cannot be reached or refuses the credentials.
_UNREACHABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                neo4j.exceptions.ServiceUnavailable, neo4j.exceptions.SessionExpired,
                neo4j.exceptions.AuthError)  # fmt: skip
_REFUSED = ("NOAUTH", "WRONGPASS", "invalid password", "invalid username-password")

# (server url, graph) pairs whose indices this process has built: graphiti's index creation is
# idempotent but costs a round trip per index, so it runs once per graph per process.
_INDEXED: set[tuple[str, str]] = set()


@asynccontextmanager
async def connect(url: str, group_id: str) -> AsyncIterator[GraphDriver]:
    """A driver on graph ``group_id`` at ``url``, its indices built, closed on exit. A database
    that cannot be reached or refuses, now or during the work, is one ConnectionFailed line."""
    with unreachable_as_connection_failed(url):
        # Built on a thread: FalkorDB's client makes a blocking call (cluster detection) when
        # created, and graphiti's drivers schedule an index build of their own when created inside
        # a running loop, which would defeat the once-per-graph build below.
        driver = await asyncio.to_thread(new_driver, url, group_id)
        try:
            if isinstance(driver, Neo4jDriver):  # one attempt, where a query retries for 30 s
                await driver.client.verify_connectivity()
            if (url, group_id) not in _INDEXED:
                await driver.build_indices_and_constraints()
                await driver.execute_query(_SOURCE_INDEX[driver.provider])
                await driver.execute_query(_VERSION_INDEX[driver.provider])
                _INDEXED.add((url, group_id))
            yield driver
        finally:
            await driver.close()


def new_driver(url: str, group_id: str) -> GraphDriver:
    """graphiti's driver for the database ``url`` names (phases.graph_db)."""
    if graph_db.kind(url) == "neo4j":
        user, password, database = graph_db.neo4j_auth()
        return Neo4jDriver(url, user, password, database=database)
    # database= names the graph; without it graphiti clones a driver per group id.
    return FalkorDriver(falkor_db=falkordb_client(url), database=group_id)


def falkordb_client(url: str) -> FalkorDB:
    """FalkorDB's client for ``url``: it gives up connecting after CONNECT_TIMEOUT_S, and waits for
    a reply as long as it takes. redis-py's asyncio client gives up reading after 5 s unless told:
    a large document's write takes longer, and the server completes what the client gave up on,
    so the job failed while the graph held its document. The job's timeout bounds the wait."""
    return FalkorDB.from_url(
        graph_db.falkordb_url(url), socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=None
    )


@contextmanager
def unreachable_as_connection_failed(url: str) -> Iterator[None]:
    try:
        yield
    except _UNREACHABLE as exc:
        raise connection_failed(url, exc) from None
    except (redis.exceptions.ResponseError, neo4j.exceptions.ClientError) as exc:
        if not any(word in str(exc) for word in _REFUSED):
            raise
        raise connection_failed(url, exc) from None


def connection_failed(url: str, exc: BaseException) -> ConnectionFailed:
    """One line naming the database (its password masked), what went wrong and the fix."""
    text = str(exc)
    if isinstance(exc, neo4j.exceptions.AuthError) or any(word in text for word in _REFUSED):
        reason = "the credentials were refused"
    else:
        first = text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__
        reason = f"cannot connect ({first})"
    for secret in (graph_db.neo4j_auth()[1], _password(url)):
        if secret:
            reason = reason.replace(secret, "***")
    return ConnectionFailed(f"graph database {masked(url)}: {reason}", fix=graph_db.fix_for(url))


def _password(url: str) -> str:
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


async def graph_exists(url: str, group_id: str) -> bool:
    """Whether graph ``group_id`` holds anything at ``url``, without creating it."""
    if graph_db.kind(url) == "neo4j":
        return True  # every group shares the database: an empty group counts zeros
    with unreachable_as_connection_failed(url):
        client = await asyncio.to_thread(falkordb_client, url)
        try:
            return group_id in await client.list_graphs()
        finally:
            await client.aclose()


async def write(driver: GraphDriver, plan: GraphPlan) -> Saved:
    """Save one document's plan, replacing what an earlier run of it wrote and, for a version of
    a name, what older versions wrote (``phases.graph_versions``); returns what it found.

    Under the name's lock, one read (the episodes of the document and its name, found through an
    index) and one write query, so the cost of a document does not depend on how large the graph
    is, and a worker that dies between the two leaves the graph as it was: the write is applied
    whole or not at all. Writing the same plan twice changes nothing.
    """
    async with graph_versions.name_lock(driver, plan):
        found = await graph_versions.saved(driver, plan)
        written = graph_versions.emptied(plan) if found.superseded else plan
        previous = [*found.own, *found.older]
        if written.episodes or previous:
            await driver.execute_query(_WRITE, **_write_parameters(written, previous, datetime.now(UTC)))
    return found


def _write_parameters(plan: GraphPlan, previous: Sequence[SavedEpisode], now: datetime) -> dict[str, Any]:
    """The write query's parameters: what to add, and what the documents written before (an
    earlier run of this one, older versions) stated that this one does not: their facts lose
    their weight, one per document, and the entities they alone mentioned go."""
    stamp = now.isoformat()
    kept = {episode.uuid for episode in plan.episodes}
    by_document: dict[str, set[str]] = {}
    for episode in previous:
        by_document.setdefault(episode.source, set()).update(episode.edges)
    stated = Counter(uuid for uuids in by_document.values() for uuid in uuids)
    relations = [
        {"uuid": r.uuid, "source": r.source, "target": r.target, "fact": r.fact,
         "episodes": r.episodes[:MAX_FACT_EPISODES], "delta": 1 - stated[r.uuid]}
        for r in plan.relations
    ]  # fmt: skip
    planned = {r.uuid for r in plan.relations}
    return {
        "group_id": plan.group_id,
        "now": stamp,
        "name": RELATION_NAME,
        "max_episodes": MAX_FACT_EPISODES,
        "gone": [e.uuid for e in previous if e.uuid not in kept],
        "released": [{"uuid": u, "documents": n} for u, n in sorted(stated.items()) if u not in planned],
        "document_episodes": sorted(kept | {e.uuid for e in previous}),
        "orphans": sorted({uuid for e in previous for uuid in e.entities}),
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
         "entity_edges": edge_uuids_by_episode.get(e.uuid, []), "created_at": stamp, "valid_at": stamp,
         **graph_versions.properties(plan)}
        for e in plan.episodes
    ]  # fmt: skip


# One document's write, in one query (so applied whole or not at all). Every lookup goes through an
# index on uuid; a fact is one edge per pair of entities, so MERGE expands only the edges between
# two nodes, never a hub's. Statements are chained with an aggregate, which yields a row even
# when the list before it was empty.
_WRITE = "\nWITH count(*) AS chained\n".join(
    [
        # the episodes the document no longer has, with their MENTIONS
        "UNWIND $gone AS uuid MATCH (e:Episodic) WHERE e.uuid = uuid DETACH DELETE e",
        # facts the documents written before stated and this one does not: one less per document
        # that stated them; gone once none does
        "UNWIND $released AS rel MATCH ()-[r:RELATES_TO]->() WHERE r.uuid = rel.uuid "
        "SET r.weight = coalesce(r.weight, rel.documents) - rel.documents, "
        "r.episodes = [x IN coalesce(r.episodes, []) WHERE NOT x IN $document_episodes]",
        # (a statement of its own: FalkorDB drops the SET above when `WITH r WHERE r.weight <= 0
        # DELETE r` follows it)
        "UNWIND $released AS rel MATCH ()-[r:RELATES_TO]->() WHERE r.uuid = rel.uuid AND r.weight <= 0 "
        "DELETE r",
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
        # graph_plan.fact_order: the shortest sentence, then the first alphabetically; this
        # document's when it alone states the fact (a sentence of a replaced version goes). Set
        # before the weight, so it reads the weight as it was.
        "ON MATCH SET r.fact = CASE WHEN coalesce(r.weight, 0) + re.delta <= 1 "
        "OR size(re.fact) < size(r.fact) OR (size(re.fact) = size(r.fact) AND re.fact < r.fact) "
        "THEN re.fact ELSE r.fact END, "
        "r.weight = coalesce(r.weight, 0) + re.delta, "
        "r.episodes = ([x IN coalesce(r.episodes, []) WHERE NOT x IN $gone] "
        "+ [x IN re.episodes WHERE NOT x IN coalesce(r.episodes, [])])[0..$max_episodes]",
        ORPHANS,
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


async def remove_stale(driver: GraphDriver, plan: GraphPlan) -> None:
    """Delete the document's episodes that this version no longer has (found through an index).

    Entities stay: other documents may mention them, and deleting one here could race another
    worker that is about to link to it.
    """
    await driver.execute_query(
        "MATCH (e:Episodic) WHERE e.source_description = $source AND e.group_id = $group_id "
        "AND NOT e.uuid IN $keep DETACH DELETE e",
        source=plan.source,
        group_id=plan.group_id,
        keep=[episode.uuid for episode in plan.episodes],
    )


async def episode_properties(driver: GraphDriver, uuids: list[str], name: str) -> dict[str, Any]:
    """Property ``name`` of each existing episode among ``uuids`` (None where unset).

    ``name`` is spliced into the query (Cypher takes no property key as a parameter): callers pass
    constants of their own, never input.
    """
    records, _, _ = await driver.execute_query(
        f"MATCH (e:Episodic) WHERE e.uuid IN $uuids RETURN e.uuid AS uuid, e.{name} AS value", uuids=uuids
    )
    return {record["uuid"]: record["value"] for record in records}


async def set_episode_property(driver: GraphDriver, uuid: str, name: str, value: Any) -> None:
    query = f"MATCH (e:Episodic {{uuid: $uuid}}) SET e.{name} = $value"
    await driver.execute_query(query, uuid=uuid, value=value)


async def search(driver: GraphDriver, group_id: str, query: str, limit: int) -> list[dict[str, Any]]:
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


async def counts(driver: GraphDriver, group_id: str) -> dict[str, int]:
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
