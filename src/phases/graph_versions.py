"""Versions of a document in the knowledge graph: the newest replaces what older ones wrote.

A document that is a version of a name (``GraphPlan.version_of``, from levers' ``Document.version``)
tags its episodes with the name, its number and whether it keeps older versions (the episode
properties VERSION_OF, VERSION and KEEP). As it is written, under a lock on the name:

- unless it keeps them, older versions' episodes go, with the facts (RELATES_TO) and entities
  that only they supported, so the graph never answers from a superseded text;
- a version older than one in the graph that replaced it writes nothing, and what it wrote before
  goes: of two versions in flight at once, the newest submitted wins, whichever finishes first.

The lock is a Redis lock in FalkorDB's own server, so every worker on every host sees it (in
Neo4j, a lock node whose holder and expiry one query sets); it makes reading what the graph holds
of the name and the write that follows one step. A name's episodes are found through an index on
VERSION_OF (phases.graph_store builds it). Each write
is one query, applied whole or not at all, so a worker killed mid-removal leaves the graph as it
was (or done), its lock expires after LOCK_TTL_S, and the job's retry completes the removal.

Offline, ``phases.graph_store.write`` removes older versions in the query that writes the new one
(its facts count the documents that state them). With an LLM, ``remove`` does what graphiti's
``Graphiti.remove_episode`` does, for all of a version's episodes in one query: each fact loses
them from its ``episodes`` and goes when none is left, and entities no episode MENTIONS go.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from redis.exceptions import LockError

if TYPE_CHECKING:
    from graphiti_core.driver.driver import GraphDriver

    from phases.graph_plan import GraphPlan

# Episode properties (graphiti's data model has no place for them; its queries leave them be).
VERSION_OF = "levers_version_of"
VERSION = "levers_version"
KEEP = "levers_keep"

# How long a lock lasts unless its holder renews it (every third of it, while it writes): a killed
# worker's lock goes after this, a few seconds of a retry's time; and how long a worker waits
# for a lock before its job fails and is retried.
LOCK_TTL_S = 15
LOCK_WAIT_S = 120
# How often a worker looks again at a lock node another holds.
LOCK_POLL_S = 0.1

# Entities that no episode MENTIONS any more go (an entity of graphiti's model is what episodes
# mention); DETACH takes the facts that linked them, which no episode states either.
ORPHANS = (
    "UNWIND $orphans AS uuid MATCH (n:Entity) WHERE n.uuid = uuid "
    "OPTIONAL MATCH (n)<-[m:MENTIONS]-(:Episodic) WITH n, count(m) AS mentions "
    "WHERE mentions = 0 DETACH DELETE n"
)

_EPISODES = (
    "MATCH (e:Episodic) WHERE e.{key} = $value AND e.group_id = $group_id "
    "OPTIONAL MATCH (e)-[:MENTIONS]->(n:Entity) WITH e, collect(n.uuid) AS entities "
    f"RETURN e.uuid AS uuid, e.source_description AS source, e.{VERSION} AS version, e.{KEEP} AS keep, "
    "e.entity_edges AS edges, entities"
)


@dataclass(frozen=True)
class SavedEpisode:
    """An episode as the graph holds it: its document (``source``), version, the facts it states
    (graphiti's ``entity_edges``) and the entities it MENTIONS."""

    uuid: str
    source: str
    version: int | None
    keep: bool
    edges: list[str]
    entities: list[str]


@dataclass(frozen=True)
class Saved:
    """What the graph holds of a plan's document and name, as the plan is about to be written."""

    own: list[SavedEpisode]  # the document's own episodes
    older: list[SavedEpisode]  # older versions' episodes, which the plan replaces
    superseded: bool  # a newer version that replaced this one is in the graph

    @property
    def replaced(self) -> list[str]:
        """The sources (documents) of the older versions replaced."""
        return sorted({episode.source for episode in self.older})


async def saved(driver: GraphDriver, plan: GraphPlan) -> Saved:
    """The episodes of the plan's document and, for a version, of its name's other versions."""
    episodes = await _episodes(driver, "source_description", plan.source, plan.group_id)
    if plan.version_of is not None:
        episodes += await _episodes(driver, VERSION_OF, plan.version_of, plan.group_id)
    return sort_out(plan, {episode.uuid: episode for episode in episodes}.values())


def sort_out(plan: GraphPlan, episodes: Iterable[SavedEpisode]) -> Saved:
    own = [e for e in episodes if e.source == plan.source]
    others = [e for e in episodes if e.source != plan.source and e.version is not None]
    superseded = any(e.version > plan.version and not e.keep for e in others if e.version is not None)
    older = [e for e in others if e.version is not None and e.version < plan.version]
    return Saved(own, [] if superseded or plan.keep_versions else older, superseded)


async def _episodes(driver: GraphDriver, key: str, value: str, group_id: str) -> list[SavedEpisode]:
    # every group of a Neo4j database shares it: the group is part of what is looked up
    records, _, _ = await driver.execute_query(_EPISODES.format(key=key), value=value, group_id=group_id)
    return [_episode(record) for record in records]


def _episode(record: dict[str, Any]) -> SavedEpisode:
    version = record["version"]
    return SavedEpisode(
        uuid=str(record["uuid"]),
        source=str(record["source"]),
        version=version if isinstance(version, int) and not isinstance(version, bool) else None,
        keep=record["keep"] is True,
        edges=[str(uuid) for uuid in record["edges"] or []],
        entities=[str(uuid) for uuid in record["entities"] or []],
    )


@asynccontextmanager
async def name_lock(driver: GraphDriver, plan: GraphPlan) -> AsyncIterator[None]:
    """Hold the lock of the plan's name (of its document, for one with no versions)."""
    held = (plan.version_of or plan.source).encode(errors="surrogateescape")
    key = f"levers:graph:{plan.group_id}:lock:{hashlib.sha256(held).hexdigest()[:32]}"
    client = getattr(driver, "client", None)
    connection = getattr(client, "connection", None)
    if connection is not None and hasattr(connection, "lock"):  # FalkorDB: its own Redis
        async with redis_lock(connection, key):
            yield
        return
    async with graph_lock(driver, key):
        yield


@asynccontextmanager
async def redis_lock(connection: Any, key: str) -> AsyncIterator[None]:
    """A Redis lock, renewed while held. Its release after a failed write fails quietly: the
    write's error is the one to report (a lock lost meanwhile would otherwise be all that shows)."""
    lock = connection.lock(key, timeout=LOCK_TTL_S)
    if not await lock.acquire(blocking_timeout=LOCK_WAIT_S):
        raise TimeoutError(f"the graph lock {key} was held for {LOCK_WAIT_S} s by another worker")
    try:
        async with renewed(lock.reacquire):
            yield
    except BaseException:
        with contextlib.suppress(LockError):
            await lock.release()
        raise
    await lock.release()


@asynccontextmanager
async def renewed(renew: Callable[[], Awaitable[object]]) -> AsyncIterator[None]:
    """Call ``renew`` every third of LOCK_TTL_S while the body runs: a large document's write
    outlasts the TTL, which is kept short so that a killed worker's lock goes soon."""

    async def keep() -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            await renew()

    task = asyncio.create_task(keep())
    try:
        yield
    finally:
        task.cancel()
        # a renewal that failed (the lock lost, the server gone) shows when the lock is released
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


# Setting ``taking`` first takes the node's write lock, so the expiry is read under it.
_TAKE_LOCK = (
    "MERGE (l:LeversLock {key: $key}) SET l.taking = $owner "
    "WITH l WHERE coalesce(l.until, 0) < $now SET l.until = $until, l.owner = $owner "
    "RETURN l.owner AS owner"
)
_RENEW_LOCK = "MATCH (l:LeversLock {key: $key}) WHERE l.owner = $owner SET l.until = $until"
_GIVE_LOCK = "MATCH (l:LeversLock {key: $key}) WHERE l.owner = $owner SET l.until = 0"


@asynccontextmanager
async def graph_lock(driver: GraphDriver, key: str) -> AsyncIterator[None]:
    """A lock in the graph database itself, for one without a Redis beside it (Neo4j): a node
    whose holder and expiry one query sets when the last holder's expiry has passed."""
    owner, deadline = uuid.uuid4().hex, time.monotonic() + LOCK_WAIT_S
    while True:
        now = time.time()
        taken = {"key": key, "owner": owner, "now": now, "until": now + LOCK_TTL_S}
        records, _, _ = await driver.execute_query(_TAKE_LOCK, **taken)
        if records:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the graph lock {key} was held for {LOCK_WAIT_S} s by another worker")
        await asyncio.sleep(LOCK_POLL_S)
    try:
        async with renewed(
            lambda: driver.execute_query(_RENEW_LOCK, key=key, owner=owner, until=time.time() + LOCK_TTL_S)
        ):
            yield
    finally:
        await driver.execute_query(_GIVE_LOCK, key=key, owner=owner)


def emptied(plan: GraphPlan) -> GraphPlan:
    """The plan of a superseded version: nothing to write, what it wrote to remove."""
    return replace(plan, episodes=[], entities=[], mentions=[], relations=[])


def properties(plan: GraphPlan) -> dict[str, Any]:
    """The version properties of the plan's episodes (None, unset, for a document with none)."""
    versioned = plan.version_of is not None
    return {
        VERSION_OF: plan.version_of,
        VERSION: plan.version if versioned else None,
        KEEP: plan.keep_versions if versioned else None,
    }


async def tag(driver: GraphDriver, plan: GraphPlan) -> None:
    """Set the version properties on the plan's episodes (graphiti's saves drop them)."""
    if plan.version_of is None:
        return
    await driver.execute_query(
        f"UNWIND $uuids AS uuid MATCH (e:Episodic) WHERE e.uuid = uuid "
        f"SET e.{VERSION_OF} = $version_of, e.{VERSION} = $version, e.{KEEP} = $keep",
        uuids=[episode.uuid for episode in plan.episodes],
        version_of=plan.version_of,
        version=plan.version,
        keep=plan.keep_versions,
    )


async def remove(driver: GraphDriver, episodes: list[SavedEpisode]) -> None:
    """Delete ``episodes`` as graphiti's remove_episode does, in one query."""
    if episodes:
        await driver.execute_query(
            _REMOVE,
            gone=[e.uuid for e in episodes],
            edges=sorted({uuid for e in episodes for uuid in e.edges}),
            orphans=sorted({uuid for e in episodes for uuid in e.entities}),
        )


_REMOVE = "\nWITH count(*) AS _\n".join(
    [
        "UNWIND $edges AS uuid MATCH ()-[r:RELATES_TO]->() WHERE r.uuid = uuid "
        "SET r.episodes = [x IN coalesce(r.episodes, []) WHERE NOT x IN $gone]",
        "UNWIND $edges AS uuid MATCH ()-[r:RELATES_TO]->() WHERE r.uuid = uuid AND size(r.episodes) = 0 "
        "DELETE r",
        "UNWIND $gone AS uuid MATCH (e:Episodic) WHERE e.uuid = uuid DETACH DELETE e",
        ORPHANS,
    ]
)
