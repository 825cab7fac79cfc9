"""How a shared limit learns the rate and concurrency its provider really allows.

The declared figures (pipeline.yaml) are a ceiling; what the limit holds its callers to is the
effective figures, kept in Redis for every worker on every host and changed only by the limit's
server-side scripts (levers/limits/scripts.py):

- A refusal (429 or 529) cuts the effective rate and concurrency to ``CUT_FACTOR`` of what they
  were, once per round: calls admitted before a cut and refused after it were sent at the old
  figures and do not cut the rate again, so a burst of refusals is one cut, not one per call. Each
  of them takes one slot off the concurrency the round was sent at instead: the provider refused
  that many of the calls it received at once (6 sent, 4 refused: 2 remain).
- A refusal's retry-after pauses every caller, not only the refused one: no call of the limit
  starts, on any host, until it has passed.
- After a quiet period (one window) without a refusal, a figure that held calls back is raised by
  ``RAISE_SHARE`` of the declared figure, never above it. A figure nobody waited for is left
  alone: using it is the only way to learn whether the provider allows more. A raise that
  brought a refusal doubles the quiet period before the next (up to ``MAX_QUIET_WINDOWS``); a
  raise that did not halves it again.
- Where the provider states its rate (Anthropic's ``anthropic-ratelimit-requests-limit``, per
  minute), the limit follows it instead of guessing: the effective rate is the stated one
  (scaled to the limit's window, never above the declared), and refusals cut only concurrency,
  which no header states. When the provider says no request remains
  (``anthropic-ratelimit-requests-remaining: 0``), every caller pauses until one is back: one
  request's share of the minute, or the stated ``-reset`` if that comes first.

What was learned is forgotten after ``STATE_TTL_S`` without a call.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# A refusal leaves this share of the effective figures (as TCP CUBIC does; 0.5 undershoots more).
CUT_FACTOR = 0.7
# A raise adds this share of the declared figure (at least one call).
RAISE_SHARE = 0.1
# The quiet period before a raise grows to at most this many windows while raises keep failing.
MAX_QUIET_WINDOWS = 16
# No pause, retry-after or stated reset is honoured for longer than this.
MAX_PAUSE_S = 600
# A stated rate above this (per window) is not a rate.
MAX_PROVIDER_RATE = 10_000_000
# Refusals kept for the per-minute count; more in one minute are counted as this many.
REFUSALS_KEPT = 10_000
# What a limit learned is kept this long after its last call.
STATE_TTL_S = 24 * 3600

LIMIT_HEADER = "anthropic-ratelimit-requests-limit"
REMAINING_HEADER = "anthropic-ratelimit-requests-remaining"
RESET_HEADER = "anthropic-ratelimit-requests-reset"


@dataclass(frozen=True)
class Outcome:
    """What one answer of the provider tells the limit, beyond whether it was refused."""

    pause_s: float | None = None  # no call of the limit starts for this long
    provider_rate: float | None = None  # the rate the provider states, per window of the limit


def header(headers: Mapping[str, Any], name: str) -> Any:
    """A header by its lower-case name, from a case-insensitive mapping or a plain dict."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    return value


def headers_of(answer: object) -> Mapping[str, Any] | None:
    """The headers an answer or an error carries: its own (a raw response, Deepgram's errors) or
    its response's (Anthropic's and httpx's errors)."""
    headers = getattr(answer, "headers", None)
    if not isinstance(headers, Mapping):
        headers = getattr(getattr(answer, "response", None), "headers", None)
    return headers if isinstance(headers, Mapping) else None


def asked_wait(headers: Mapping[str, Any] | None) -> float | None:
    """The wait a refusal's headers ask for: retry-after-ms, else retry-after (seconds, as Anthropic
    sends it; the rare HTTP-date form says nothing), when it is a number of seconds >= 0."""
    if headers is None:
        return None
    milliseconds = _number(header(headers, "retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    return _number(header(headers, "retry-after"))


def stated(headers: Mapping[str, Any] | None, window_s: float, now: float) -> Outcome:
    """The provider's rate-limit headers, read: its rate per ``window_s``, and a pause when no
    request remains. ``now`` is this host's clock (time.time()), for the absolute reset time.
    Headers that are absent or malformed say nothing."""
    if headers is None:
        return Outcome()
    per_minute = _number(header(headers, LIMIT_HEADER))
    per_minute = per_minute if per_minute is not None and per_minute > 0 else None
    rate = per_minute * window_s / 60 if per_minute is not None else None
    if rate is not None and rate > MAX_PROVIDER_RATE:
        rate = None
    remaining = _number(header(headers, REMAINING_HEADER))
    if remaining is None or remaining >= 1:
        return Outcome(provider_rate=rate)
    waits = [60 / per_minute] if per_minute is not None else []
    reset = _instant(header(headers, RESET_HEADER))
    if reset is not None:
        waits.append(reset - now)
    pause = min(waits, default=None)
    return Outcome(
        pause_s=max(0.0, min(pause, MAX_PAUSE_S)) if pause is not None else None, provider_rate=rate
    )


def _number(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _instant(value: object) -> float | None:
    """An RFC 3339 time (``2026-01-01T00:00:30Z``) as a POSIX timestamp; None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None
