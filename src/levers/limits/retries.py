"""When a provider's answer means "try again", and how long to wait: what SharedLimit.call and a
phase's own retry loop decide by.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

# The longest backoff between retries when the provider gives no retry-after.
MAX_BACKOFF_S = 60.0
# A retry-after is honoured up to this share longer (never shorter), to spread the retries.
RETRY_AFTER_JITTER = 0.1
# Too many requests, and Anthropic's "overloaded".
RATE_LIMIT_STATUSES = frozenset({429, 529})
# The provider failed, not the request: the same request may well succeed a moment later.
SERVER_ERROR_STATUSES = range(500, 600)


class RateLimited(Exception):
    """Raise from a call made through ``SharedLimit.call`` to have it retried after ``retry_after`` s.

    With ``retry_after`` None, the retry waits by jittered exponential backoff.
    """

    def __init__(self, retry_after: float | None = None, message: str = "rate limited") -> None:
        super().__init__(message)
        self.retry_after = retry_after


def is_rate_limited(exc: BaseException) -> bool:
    """Whether ``exc`` says "too many requests": RateLimited, or a status of 429 or 529."""
    return isinstance(exc, RateLimited) or status_of(exc) in RATE_LIMIT_STATUSES


def is_server_error(exc: BaseException) -> bool:
    """Whether ``exc`` carries a 5xx status other than those that mean "too many requests"."""
    status = status_of(exc)
    return status in SERVER_ERROR_STATUSES and status not in RATE_LIMIT_STATUSES


def status_of(exc: BaseException) -> int | None:
    """The HTTP status ``exc`` carries, on itself or on its response; None when it has none."""
    status = getattr(exc, "status_code", None)
    if status is None:
        # httpx.HTTPStatusError and the like carry the status on their response only
        status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def retry_after_s(exc: BaseException) -> float | None:
    """The wait ``exc`` asks for: RateLimited.retry_after, else the retry-after headers of its
    response (Anthropic's and httpx's errors) or its own ``headers`` (Deepgram's)."""
    if isinstance(exc, RateLimited):
        return exc.retry_after
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if headers is None:
        headers = getattr(exc, "headers", None)
    if not isinstance(headers, Mapping):
        return None
    try:
        return float(_header(headers, "retry-after-ms")) / 1000
    except (TypeError, ValueError):
        pass
    try:
        # seconds, as Anthropic sends it; the rare HTTP-date form falls back to backoff
        return float(_header(headers, "retry-after"))
    except (TypeError, ValueError):
        return None


def _header(headers: Mapping[str, Any], name: str) -> Any:
    """A header by its lower-case name, from a case-insensitive mapping or a plain dict."""
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == name), None)
    return value


def retry_delay(exc: BaseException, attempt: int, backoff_s: float) -> float:
    """Seconds before retry ``attempt + 1``: the asked wait (up to 10 % more), else jittered backoff."""
    asked = retry_after_s(exc)
    if asked is not None and asked >= 0:
        return asked * random.uniform(1.0, 1.0 + RETRY_AFTER_JITTER)
    return min(MAX_BACKOFF_S, backoff_s * 2**attempt) * random.uniform(0.5, 1.0)
