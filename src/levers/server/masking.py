"""Passwords in URLs, masked for output: a Redis or database URL may carry one, and no command,
log line or error shows it. Imports no client library: `levers get` masks what it prints with
this alone."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

# user:password@ in a URL too malformed to parse; greedy, so a password holding '@' is covered
_USERINFO = re.compile(r"^([\w+.-]+://[^:@/]*:).*@")


def masked(url: str) -> str:
    """The URL with any password replaced by '***' (a URL too malformed to parse too)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub(r"\1***@", url)
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def masked_values(value: Any) -> Any:
    """``value`` with every string in it that is a URL with a password masked, at any depth."""
    if isinstance(value, str):
        return masked(value)
    if isinstance(value, dict):
        return {key: masked_values(item) for key, item in value.items()}
    if isinstance(value, list):
        return [masked_values(item) for item in value]
    return value


def url_password(url: str) -> str | None:
    """The password ``url`` carries, if any (of a URL too malformed to parse too)."""
    try:
        return urlsplit(url).password
    except ValueError:
        match = _USERINFO.match(url)
        return url[match.end(1) : match.end() - 1] if match else None
