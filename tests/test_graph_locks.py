"""The graph's name lock and client, against a real server: a write longer than the lock's TTL
keeps its lock, a failed write reports its own error, and a reply slower than redis-py's default
read timeout is waited for (the server would complete what the client gave up on)."""

from __future__ import annotations

import asyncio

import pytest
import redis
import redis.asyncio

from phases import graph_versions
from phases.graph_store import falkordb_client

KEY = "levers:graph:test:lock:name"
# well past the lock's TTL as the tests set it, and past redis-py's 5 s read timeout
LONG_S = 6.0


@pytest.fixture
def short_ttl(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(graph_versions, "LOCK_TTL_S", 1.5)
    return 1.5


def test_a_write_longer_than_the_ttl_keeps_its_lock(redis_url: str, short_ttl: float) -> None:
    async def scenario() -> tuple[bool, bool]:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async with graph_versions.redis_lock(client, KEY):
                await asyncio.sleep(short_ttl * 2)  # a large document's write
                # another worker finds the name still locked
                taken_meanwhile = await client.lock(KEY, timeout=10).acquire(blocking=False)
            return taken_meanwhile, bool(await client.exists(KEY))
        finally:
            await client.aclose()

    taken_meanwhile, left_behind = asyncio.run(scenario())

    assert not taken_meanwhile
    assert not left_behind  # and it was released


def test_a_failed_write_reports_its_own_error_though_its_lock_was_lost(
    redis_url: str, connection: redis.Redis
) -> None:
    async def scenario() -> None:
        client = redis.asyncio.Redis.from_url(redis_url)
        try:
            async with graph_versions.redis_lock(client, KEY):
                connection.delete(KEY)  # expired or taken while the write ran
                raise ValueError("the write failed")
        finally:
            await client.aclose()

    with pytest.raises(ValueError, match="the write failed"):
        asyncio.run(scenario())


def test_a_reply_slower_than_redis_pys_default_read_timeout_is_waited_for(redis_url: str) -> None:
    async def scenario() -> object:
        client = falkordb_client(redis_url)
        try:
            # a command the server answers after LONG_S, as it answers a long write
            return await client.connection.blpop(["nothing"], timeout=LONG_S)
        finally:
            await client.aclose()

    assert asyncio.run(scenario()) is None  # the server's "nothing came", not a client timeout
