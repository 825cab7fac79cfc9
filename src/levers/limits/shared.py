"""Limits shared by every worker of every phase on every host that uses the same Redis.

A limit declared under ``limits:`` in pipeline.yaml has up to two parts. Each is decided by one
Lua script, so a check and its update never interleave between clients, and each reads the
server's clock (TIME), so the clocks of the hosts never matter:

- ``requests_per_minute``: a sliding-window log, a sorted set with one member per call. A call
  in flight stays in the window (its stamp is renewed with its lease); when it ends, it is stamped
  with its end time and leaves the window ``window_seconds`` later. A call is admitted while
  fewer than the limit are in the window. Stamping the end rather than the admission is what
  makes the guarantee hold where it matters, at the provider: a request reaches the provider at
  some moment between its admission and its end, so any two requests that arrive there within
  one window were both in the window when the later one was admitted. A client that is slow to
  send (a first connection, a busy loop) cannot push two windows' worth into one.
- ``concurrency``: leases, a sorted set of lease ids scored by their expiry. The holder renews
  its lease every ``lease_ttl / 3``; a process that dies, even by SIGKILL, stops renewing, so
  its slots come back by themselves within ``lease_ttl``. Without a cap, leases are still taken
  (uncapped) so that calls in flight can be counted.

Both scripts hold calls to the effective figures, which the limit learns from its provider's
answers and keeps at or below the declared ones (levers/limits/adaptive.py), and to a pause every
caller honours (a refusal's retry-after).

A call takes its concurrency slot first and its rate slot last, right before it starts. The
other order would stamp a call into the window and then let it wait for a slot: stamps bunched
in one window could then start together in a later one, breaking the provider's limit. Holding a
slot while waiting for the window costs no throughput: while the rate binds, no call could start.

Waiting is polling with jitter, not a queue: the rate script says exactly how long to wait; a
freed concurrency slot is not announced, so waiters look again every ``LEASE_POLL_S``. Polling
is not FIFO, but the jitter makes every look a fair draw, so no waiter is starved for long.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar
from uuid import uuid4

import redis
import redis.asyncio

from levers import keys
from levers.errors import UsageError
from levers.limits.adaptive import MAX_PAUSE_S, Outcome, asked_wait, headers_of, stated
from levers.limits.scripts import scripts_for
from levers.pipeline.model import LimitSettings, Pipeline
from levers.server.connection import CONNECT_TIMEOUT_S

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger("levers.limits.shared")

DEFAULT_LEASE_TTL_S = 10.0
DEFAULT_MAX_RATE_RETRIES = 8
DEFAULT_BACKOFF_S = 1.0
# The longest backoff between retries when the provider gives no retry-after.
MAX_BACKOFF_S = 60.0
# How often a waiter for a concurrency slot looks again: releases are not announced.
LEASE_POLL_S = 0.05
# The longest a waiter for the rate window sleeps before looking again: calls in flight hold
# their place in the window until they end, which may be any moment.
RATE_POLL_S = 0.25
# Added at random to every wait, so that waiters woken together do not all retry together.
POLL_JITTER_S = 0.02
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


class UnknownLimit(UsageError):
    """A limit name that pipeline.yaml does not declare."""


def limit_settings(spec: Pipeline, name: str) -> LimitSettings:
    """The settings of limit ``name``; UnknownLimit, listing the declared ones, when there is none."""
    if name not in spec.limits:
        declared = ", ".join(sorted(spec.limits)) or "none"
        raise UnknownLimit(
            f"no limit named {name!r} in pipeline.yaml (declared: {declared})",
            fix=f"declare it under limits: ({name}: {{requests_per_minute: ..., concurrency: ...}})",
        )
    return spec.limits[name]


@dataclass
class Lease:
    """A held concurrency slot: its id in Redis and the task that keeps renewing it."""

    id: str
    renewal: asyncio.Task[None]
    released: bool = False
    # the limit's round of adaptation when the call was admitted (see levers.limits.adaptive)
    generation: int = 0


class SharedLimit:
    """One named limit, enforced through Redis for every client that uses the same keys.

    ``async with limit:`` waits for a slot and holds it for the block; ``await limit.call(fn, ...)``
    does the same around ``fn`` and also retries it when it is rate limited (status 429 or 529, or
    ``RateLimited``) or the provider fails (a 5xx status). The limit counts the requests it admits,
    so clients must not retry on their own: give SDK clients ``max_retries=0`` (an SDK retry is a
    request the window never saw).

    The limit learns from the answers it sees (levers.limits.adaptive): refusals lower its effective
    figures and their retry-after pauses every caller; the provider's rate-limit headers, on an
    error or on what ``fn`` returns (a raw response, e.g. ``client.messages.with_raw_response.create``),
    set its rate.

    One instance may serve many tasks of one event loop at once; its client must belong to that
    loop. A lease is renewed by a task of that loop, so a handler that blocks the loop longer than
    ``lease_ttl`` loses its slot (a warning is logged): run blocking work with ``ctx.run_in_thread``.
    """

    def __init__(
        self,
        name: str,
        settings: LimitSettings,
        client: redis.asyncio.Redis,
        *,
        pipeline: str,
        lease_ttl: float = DEFAULT_LEASE_TTL_S,
        max_rate_retries: int = DEFAULT_MAX_RATE_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
    ) -> None:
        if lease_ttl <= 0 or max_rate_retries < 0 or backoff_s < 0:
            raise ValueError("lease_ttl must be > 0, max_rate_retries and backoff_s >= 0")
        self.name = name
        self.settings = settings
        self.client = client
        self.lease_ttl = lease_ttl
        self.max_rate_retries = max_rate_retries
        self.backoff_s = backoff_s
        self._window_key = keys.limit_window(pipeline, name)
        self._leases_key = keys.limit_leases(pipeline, name)
        self._totals_key = keys.limit_totals(pipeline, name)
        self._adaptive_key = keys.limit_adaptive(pipeline, name)
        self._refusals_key = keys.limit_refusals(pipeline, name)
        self._scripts = scripts_for(client)
        # the longest any entry can stay in the window: held in flight, then one window
        self._window_life_ms = _ms(settings.window_seconds) + _ms(lease_ttl)
        # the leases each task holds through `async with`, innermost last
        self._held: dict[asyncio.Task[Any] | None, list[Lease]] = {}

    async def __aenter__(self) -> Lease:
        lease = await self.acquire()
        self._held.setdefault(asyncio.current_task(), []).append(lease)
        return lease

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        task = asyncio.current_task()
        held = self._held[task]
        lease = held.pop()
        if not held:
            del self._held[task]
        await self.release(lease, rate_limited=exc is not None and is_rate_limited(exc), answer=exc)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``await fn(*args, **kwargs)`` inside the limit, retried while it is rate limited or the
        provider answers a server error (5xx).

        Between retries the slot is released and the wait honours the error's retry-after
        (``RateLimited.retry_after`` or the retry-after-ms / retry-after header of its response or
        of its own ``headers``), or backs off exponentially with jitter. After ``max_rate_retries``
        retries the error is raised; any other error is raised at once. These retries are the
        call's own: they do not spend the job's.
        """
        attempt = 0
        while True:
            lease = await self.acquire()
            rate_limited = False
            answer: object = None
            try:
                answer = await fn(*args, **kwargs)
                return answer
            except Exception as exc:
                answer = exc
                rate_limited = is_rate_limited(exc)
                if not (rate_limited or is_server_error(exc)) or attempt >= self.max_rate_retries:
                    raise
                delay = retry_delay(exc, attempt, self.backoff_s)
                reason = "rate limited" if rate_limited else f"server error {_status(exc)}"
            finally:
                await self.release(lease, rate_limited=rate_limited, answer=answer)
            attempt += 1
            log.info("limit %r: %s, retry %d in %.2f s", self.name, reason, attempt, delay)
            await asyncio.sleep(delay)

    async def acquire(self) -> Lease:
        """Wait for a concurrency slot, then for room in the rate window; pair with ``release``."""
        lease = await self._take_lease()
        try:
            generation = await self._take_rate_slot(lease.id)
            if generation is not None:
                lease.generation = generation
        except BaseException:
            await self._end(lease, calls=False, rate_limited=False)
            raise
        return lease

    async def release(self, lease: Lease, *, rate_limited: bool = False, answer: object = None) -> None:
        """Give the slot back, count the call (and whether the provider rate limited it), and learn
        from ``answer``, the call's result or error: its retry-after and rate-limit headers."""
        await self._end(lease, calls=True, rate_limited=rate_limited, answer=answer)

    async def _take_lease(self) -> Lease:
        lease_id = uuid4().hex
        rated = int(self.settings.requests_per_minute is not None)
        args: list[int | str] = [self.settings.concurrency or 0, _ms(self.lease_ttl), lease_id, rated]
        keys_ = [self._leases_key, self._totals_key, self._adaptive_key, self._window_key]
        while True:
            try:
                wait_ms, generation, paused = await self._scripts.acquire(keys=keys_, args=args)
                _raise_if_cancelled()
            except asyncio.CancelledError:
                # the script may have run before the cancellation: do not leave the slot taken
                await asyncio.shield(self._settle(lease_id, calls=False, rate_limited=False))
                raise
            if wait_ms == 0:
                return Lease(lease_id, asyncio.create_task(self._renew(lease_id)), generation=generation)
            # a pause is exact; a freed slot is not announced, so a slot is looked for again soon
            wait_s = wait_ms / 1000 if paused else min(wait_ms / 1000, LEASE_POLL_S)
            await asyncio.sleep(wait_s + random.uniform(0, POLL_JITTER_S))

    async def _take_rate_slot(self, member: str) -> int | None:
        """Wait for room in the window; the limit's generation at admission (None without a rate)."""
        limit = self.settings.requests_per_minute
        if limit is None:
            return None
        window_ms = _ms(self.settings.window_seconds)
        args: list[int | str] = [limit, window_ms, member, _ms(self.lease_ttl), _ms(RATE_POLL_S)]
        keys_ = [self._window_key, self._adaptive_key]
        while True:
            wait_ms, generation, _ = await self._scripts.rate(keys=keys_, args=args)
            _raise_if_cancelled()  # acquire() takes an admitted call back out of the window
            if wait_ms == 0:
                return int(generation)
            await asyncio.sleep(wait_ms / 1000 + random.uniform(0, POLL_JITTER_S))

    async def _renew(self, lease_id: str) -> None:
        while True:
            await asyncio.sleep(self.lease_ttl / 3)
            try:
                renewed = await self._scripts.renew(
                    keys=[self._leases_key, self._window_key],
                    args=[_ms(self.lease_ttl), lease_id, self._window_life_ms],
                )
            except (redis.RedisError, OSError) as exc:
                _raise_if_cancelled()
                # the lease still has two thirds of its ttl: the next renewal may succeed
                log.warning("limit %r: could not renew a lease (%s); trying again", self.name, exc)
                continue
            # a cancel lost by the client here would keep renewing, and its releaser waiting, forever
            _raise_if_cancelled()
            if not renewed:
                log.warning("limit %r: a lease expired unrenewed (event loop blocked for %.1f s?); its call "
                            "no longer counts as in flight", self.name, self.lease_ttl)  # fmt: skip
                return

    async def _end(self, lease: Lease, *, calls: bool, rate_limited: bool, answer: object = None) -> None:
        if lease.released:
            return
        lease.released = True
        lease.renewal.cancel()
        await asyncio.wait([lease.renewal])
        await self._settle(lease.id, calls=calls, rate_limited=rate_limited, generation=lease.generation,
                          answer=answer)  # fmt: skip

    async def _settle(
        self, lease_id: str, *, calls: bool, rate_limited: bool, generation: int = 0, answer: object = None
    ) -> None:
        """End a call: stamp its end in the window, drop its lease, count it, learn from its answer.
        Logs a failure rather than raising it: raising would hide the call's own outcome, and the
        lease expires by itself."""
        outcome = self._outcome(answer, rate_limited)
        args: list[int | str | float] = [
            lease_id, self._window_life_ms, int(calls), int(rate_limited), generation,
            -1 if outcome.pause_s is None else _ms(outcome.pause_s),
            -1 if outcome.provider_rate is None else outcome.provider_rate,
            self.settings.requests_per_minute or 0, self.settings.concurrency or 0,
            _ms(self.settings.window_seconds),
        ]  # fmt: skip
        keys_ = [self._window_key, self._leases_key, self._totals_key, self._adaptive_key, self._refusals_key]
        try:
            await self._scripts.finish(keys=keys_, args=args)
        except (redis.RedisError, OSError) as exc:
            log.warning("limit %r: could not release a lease (%s); it expires within %.1f s", self.name, exc,
                        self.lease_ttl)  # fmt: skip

    def _outcome(self, answer: object, rate_limited: bool) -> Outcome:
        """What ``answer`` tells every caller: the provider's stated rate, and how long nobody
        starts a call (a refusal's retry-after, or until the provider has a request again)."""
        told = stated(headers_of(answer), self.settings.window_seconds, time.time())
        asked = retry_after_s(answer) if rate_limited and isinstance(answer, BaseException) else None
        pauses = [p for p in (told.pause_s, asked) if p is not None and 0 < p <= MAX_PAUSE_S]
        return Outcome(pause_s=max(pauses, default=None), provider_rate=told.provider_rate)


def _raise_if_cancelled() -> None:
    """Honour a cancellation the Redis client lost. redis-py's asyncio client can swallow a
    cancel that strikes during a command (measured with redis-py 8.1: 69 of 3,000 cancels of a
    script call in a loop): a waiter would then poll on, and make its call after its caller had
    given up on it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class JobLimits:
    """``ctx.limit`` for one job: its declared limits on one async client made on first use.

    Call it only inside the job's event loop (an async handler): the client belongs to the loop
    it was made in, which is why each job makes its own. ``aclose`` it before the loop ends.
    """

    def __init__(self, spec: Pipeline, url: str) -> None:
        self.spec = spec
        self._url = url
        self._client: redis.asyncio.Redis | None = None
        self._made: dict[str, SharedLimit] = {}

    def __call__(self, name: str) -> SharedLimit:
        """The limit ``name``, the same instance for every use in the job; UnknownLimit if undeclared."""
        if name not in self._made:
            settings = limit_settings(self.spec, name)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(f"ctx.limit({name!r}) is for async handlers (async def handler)") from None
            if self._client is None:
                self._client = redis.asyncio.Redis.from_url(
                    self._url, socket_connect_timeout=CONNECT_TIMEOUT_S
                )
            self._made[name] = SharedLimit(name, settings, self._client, pipeline=self.spec.name)
        return self._made[name]

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()


def is_rate_limited(exc: BaseException) -> bool:
    """Whether ``exc`` says "too many requests": RateLimited, or a status of 429 or 529."""
    return isinstance(exc, RateLimited) or _status(exc) in RATE_LIMIT_STATUSES


def is_server_error(exc: BaseException) -> bool:
    """Whether ``exc`` carries a 5xx status other than those that mean "too many requests"."""
    status = _status(exc)
    return status in SERVER_ERROR_STATUSES and status not in RATE_LIMIT_STATUSES


def _status(exc: BaseException) -> int | None:
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
    return asked_wait(headers_of(exc))


def retry_delay(exc: BaseException, attempt: int, backoff_s: float) -> float:
    """Seconds before retry ``attempt + 1``: the asked wait (up to 10 % more), else jittered backoff."""
    asked = retry_after_s(exc)
    if asked is not None and 0 <= asked <= MAX_PAUSE_S:
        return asked * random.uniform(1.0, 1.0 + RETRY_AFTER_JITTER)
    return min(MAX_BACKOFF_S, backoff_s * 2**attempt) * random.uniform(0.5, 1.0)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
