"""Riding out a Redis outage: wait for the server with backoff, one line when it is lost, one when back.

The long-running processes (the supervisor, the workers, RQ's scheduler) use clients that never send
a command again on their own (``no_resend``): redis-py would resend a transaction whose reply was
lost, and apply it twice. Each caller decides instead what a dropped connection means for its call:
an idempotent call waits for the server and goes again (``Outage.call``); taking a job, a job's outcome
or a requeue first looks at what got through.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import redis
from redis.backoff import NoBackoff
from redis.exceptions import AuthorizationError
from redis.retry import Retry

T = TypeVar("T")

# The server cannot be reached now: refused, reset, timed out, or still loading its data after a
# restart (BusyLoadingError is a ConnectionError).
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
# The server answers but refuses these credentials: waiting will not change that.
REFUSED = (redis.AuthenticationError, AuthorizationError)
# Waits between attempts while the server is away: the first, doubling up to the last. The last
# bounds how long after the server's return a process notices it.
FIRST_WAIT_S = 0.1
MAX_WAIT_S = 2.0


def no_resend(client: redis.Redis) -> redis.Redis:
    """Make ``client`` raise at once when its connection drops, rather than resend the command."""
    client.set_retry(Retry(NoBackoff(), 0))
    return client


def where(client: redis.Redis) -> str:
    """The server's address as a person reads it (never a password)."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return str(kwargs["path"])
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


def reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Outage:
    """One process's view of its connection to Redis, shared by its threads.

    ``failed`` and ``over`` follow an outage without blocking (for a loop that has other things to
    do meanwhile); ``wait`` blocks until the server answers a PING; ``call`` runs an idempotent call
    until it gets through. Each outage logs one line when it starts and one when it ends.
    """

    def __init__(self, connection: redis.Redis, log: logging.Logger) -> None:
        self.connection = connection
        self.log = log
        self._lock = threading.Lock()
        self._since: float | None = None
        self._wait_s = FIRST_WAIT_S

    @property
    def on(self) -> bool:
        return self._since is not None

    def lasted(self, seconds: float) -> bool:
        """Whether the server has been away this long now."""
        since = self._since
        return since is not None and time.monotonic() - since >= seconds

    def failed(self, exc: BaseException) -> float:
        """Note a call that could not reach the server; returns how long to wait before the next."""
        if self._since is None:
            self._since = time.monotonic()
            self._wait_s = FIRST_WAIT_S
            self.log.warning(
                "lost the connection to Redis at %s (%s): waiting for it", where(self.connection), reason(exc)
            )
        wait_s = self._wait_s
        self._wait_s = min(self._wait_s * 2, MAX_WAIT_S)
        return wait_s

    def over(self) -> bool:
        """Note a call that got through; True when it ends an outage."""
        if self._since is None:
            return False
        self.log.warning(
            "Redis at %s is back after %.1f s", where(self.connection), time.monotonic() - self._since
        )
        self._since = None
        return True

    def wait(self, exc: BaseException) -> None:
        """Block until the server answers again. A thread that finds it answering at once logs
        nothing: another thread saw the outage end, or the connection only needed renewing."""
        with self._lock:
            while True:
                try:
                    self.connection.ping()
                except UNREACHABLE:
                    time.sleep(self.failed(exc))
                    continue
                self.over()
                return

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """``fn(*args)``, sent again after each dropped connection once the server answers:
        only for calls that do the same however many times they get through."""
        while True:
            try:
                return fn(*args)
            except UNREACHABLE as exc:
                self.wait(exc)
