"""Which Redis a command talks to, and the connection to it.

Precedence, declared once here: REDIS_URL in the environment, then ``redis:`` in pipeline.yaml
(with ${VAR} and ${VAR:-default} expanded), then the embedded server under ``.levers/redis``.
A password never leaves this module unmasked: use ``masked`` for anything shown.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import redis

from levers.embedded import EmbeddedServer, valkey_binary
from levers.errors import ConnectionFailed, UsageError
from levers.loading import LoadedPipeline

_ENV_REFERENCE = re.compile(r"\$\{(?P<name>[A-Za-z_]\w*)(?::-(?P<default>[^}]*))?\}")
CONNECT_TIMEOUT_S = 5.0
SUPPORTED_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class Target:
    """The server a command uses. ``url`` may hold a password: show ``masked`` instead."""

    url: str
    embedded: bool

    @property
    def masked(self) -> str:
        return masked(self.url)


def embedded_server(loaded: LoadedPipeline) -> EmbeddedServer:
    return EmbeddedServer(valkey_binary(), loaded.state_dir / "redis")


def configured_url(loaded: LoadedPipeline, environ: Mapping[str, str] = os.environ) -> str | None:
    """The URL the configuration names, or None for the embedded server."""
    url = environ.get("REDIS_URL") or expand_env(loaded.spec.redis or "", environ)
    if not url:
        return None
    scheme = urlsplit(url).scheme
    if scheme not in SUPPORTED_SCHEMES:
        raise UsageError(
            f"unsupported Redis URL {masked(url)!r}",
            fix="use redis://, rediss:// or unix://",
        )
    return url


def resolve(loaded: LoadedPipeline, start: bool = True, environ: Mapping[str, str] = os.environ) -> Target:
    """The server to use; starts the embedded one when it is the choice and ``start`` is set."""
    url = configured_url(loaded, environ)
    if url is not None:
        return Target(url=url, embedded=False)
    server = embedded_server(loaded)
    running = server.ensure_running() if start else server.running()
    if running is None:
        raise ConnectionFailed("the embedded server is not running", fix="start it with `levers up`")
    return Target(url=running.url, embedded=True)


def connect(target: Target) -> redis.Redis:
    """A client for ``target`` that has answered a PING; one clear error if it does not."""
    client = redis.Redis.from_url(
        target.url, socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=30
    )
    try:
        client.ping()
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
    return client


def connect_if_running(loaded: LoadedPipeline) -> redis.Redis | None:
    """A connection to the pipeline's Redis if it answers now; never starts the embedded server."""
    url = configured_url(loaded)
    if url is None:
        running = embedded_server(loaded).running()
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


def masked(url: str) -> str:
    """The URL with any password replaced by '***'."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))
