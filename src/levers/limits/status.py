"""One shared limit as `levers status` shows it: read from the keys the limit keeps, changing none."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import redis

from levers import keys
from levers.limits.adaptive import MAX_PAUSE_S, MAX_PROVIDER_RATE

if TYPE_CHECKING:
    from levers.pipeline.outline import PipelineOutline

# The span of the refusal count.
REFUSALS_SPAN_MS = 60_000


def limits_status(connection: redis.Redis, pipeline: PipelineOutline, name: str) -> dict[str, Any]:
    """Limit ``name``, declared in ``pipeline``, now: its declared and effective figures, calls in
    flight and in the current window, refusals in the last minute, and its totals.

    Costs one TIME and one pipelined round trip, whatever the traffic.
    """
    settings = pipeline.limits[name]
    seconds, micros = connection.time()
    now_ms = seconds * 1000 + micros // 1000
    window_start_ms = now_ms - round(settings.window_seconds * 1000)
    with connection.pipeline(transaction=False) as pipe:
        pipe.zcount(keys.limit_leases(pipeline.name, name), f"({now_ms}", "+inf")
        pipe.zcount(keys.limit_window(pipeline.name, name), f"({window_start_ms}", "+inf")
        pipe.hgetall(keys.limit_totals(pipeline.name, name))
        pipe.zcount(keys.limit_refusals(pipeline.name, name), f"({now_ms - REFUSALS_SPAN_MS}", "+inf")
        pipe.hgetall(keys.limit_adaptive(pipeline.name, name))
        in_flight, in_window, totals, refused, adaptive = pipe.execute()
    counters, learned = _text_keys(totals), _text_keys(adaptive)
    rate, concurrency = settings.requests_per_minute, settings.concurrency
    provider = _bounded(learned.get("provider_rate"), 0, MAX_PROVIDER_RATE)
    paused_until = _bounded(learned.get("paused_until"), now_ms, now_ms + MAX_PAUSE_S * 1000)
    return {
        "name": name,
        "requests_per_minute": rate,
        "concurrency": concurrency,
        "window_seconds": settings.window_seconds,
        "effective_requests_per_minute": _effective_rate(rate, learned.get("rate"), provider),
        "effective_concurrency": _effective(concurrency, learned.get("concurrency")),
        "provider_requests_per_minute": provider,
        "paused_s": round((paused_until - now_ms) / 1000, 3) if paused_until is not None else 0.0,
        "rate_limited_last_minute": refused,
        "in_flight": in_flight,
        "calls_in_window": in_window,
        **{field: int(counters.get(field, 0)) for field in ("calls", "rate_limited", "peak_in_flight")},
    }


def learned_concurrency(
    connection: redis.Redis, pipeline: PipelineOutline, names: Iterable[str]
) -> dict[str, int]:
    """The limits among ``names`` whose learned concurrency is below the declared one, and that
    concurrency: what they really let through at once. One pipelined round trip."""
    declared: dict[str, int] = {}
    for name in names:
        if name in pipeline.limits and (concurrency := pipeline.limits[name].concurrency):
            declared[name] = concurrency
    with connection.pipeline(transaction=False) as pipe:
        for name in declared:
            pipe.hget(keys.limit_adaptive(pipeline.name, name), "concurrency")
        answers = pipe.execute()
    learned = {name: _effective(declared[name], value) for name, value in zip(declared, answers, strict=True)}
    return {name: value for name, value in learned.items() if value is not None and value < declared[name]}


def workers_for(concurrency: int, semaphore: int) -> int:
    """Workers that keep every slot of a limit allowing ``concurrency`` calls at once busy, each
    worker making ``semaphore`` calls at once: at least one."""
    return max(1, math.ceil(concurrency / semaphore))


def _text_keys(values: dict[Any, Any]) -> dict[str, Any]:
    # the connection may or may not decode responses
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in values.items()}


def _bounded(value: Any, low: float, high: float) -> float | None:
    """A learned figure as the limit's scripts read it: None when missing, not a number or out of bounds."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if low <= number <= high else None


def _effective(declared: int | None, learned: Any) -> int | None:
    """The whole calls a learned figure allows, as the scripts use it: the declared one when not learned."""
    if declared is None:
        return None
    value = _bounded(learned, 1, declared)
    return math.floor(value) if value is not None else declared


def _effective_rate(declared: int | None, learned: Any, provider: float | None) -> int | None:
    if declared is None or provider is None:
        return _effective(declared, learned)
    return math.floor(min(declared, max(1.0, provider)))
