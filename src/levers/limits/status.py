"""One shared limit as `levers status` shows it: read from the keys the limit keeps, changing none."""

from __future__ import annotations

from typing import Any

import redis

from levers import keys
from levers.limits.shared import limit_settings
from levers.pipeline.model import Pipeline


def limits_status(connection: redis.Redis, pipeline: Pipeline, name: str) -> dict[str, Any]:
    """Limit ``name`` now: its settings, calls in flight and in the current window, and its totals.

    Costs one TIME and one pipelined round trip, whatever the traffic.
    """
    settings = limit_settings(pipeline, name)
    seconds, micros = connection.time()
    now_ms = seconds * 1000 + micros // 1000
    window_start_ms = now_ms - round(settings.window_seconds * 1000)
    with connection.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.limit_leases(pipeline.name, name), f"({now_ms}", "+inf")
        pipe.zcount(keys.limit_window(pipeline.name, name), f"({window_start_ms}", "+inf")
        pipe.hgetall(keys.limit_totals(pipeline.name, name))
        in_flight, in_window, totals = pipe.execute()
    # the connection may or may not decode responses
    counters = {(k.decode() if isinstance(k, bytes) else k): v for k, v in totals.items()}
    return {
        "name": name,
        "requests_per_minute": settings.requests_per_minute,
        "concurrency": settings.concurrency,
        "window_seconds": settings.window_seconds,
        "in_flight": in_flight,
        "calls_in_window": in_window,
        **{field: int(counters.get(field, 0)) for field in ("calls", "rate_limited", "peak_in_flight")},
    }
