"""Which graph database a URL names, checked without importing graphiti (so validating
pipeline.yaml stays fast).

FalkorDB by URL: ``falkor://``, ``falkors://`` (TLS), ``falkordb://``, ``redis://`` or
``rediss://``, with an optional password (``falkor://:PASSWORD@host:6379``). Neo4j: ``neo4j://``,
``neo4j+s://``, ``neo4j+ssc://``, ``bolt://``, ``bolt+s://`` or ``bolt+ssc://``, its user and
password from NEO4J_USER / NEO4J_PASSWORD (never in the URL, which is printed and kept in
pipeline.yaml), its database from NEO4J_DATABASE (default "neo4j").
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal
from urllib.parse import urlsplit

from levers import masked

# FalkorDB's client takes redis:// and falkor:// URLs; the others are spelt as their equivalent.
FALKOR_SCHEMES = {
    "falkor": "redis",
    "falkordb": "redis",
    "redis": "redis",
    "falkors": "rediss",
    "rediss": "rediss",
}
NEO4J_SCHEMES = ("neo4j", "neo4j+s", "neo4j+ssc", "bolt", "bolt+s", "bolt+ssc")
DEFAULT_NEO4J_DATABASE = "neo4j"

Kind = Literal["falkordb", "neo4j"]


class GraphURLError(ValueError):
    """A graph database URL levers cannot use; the message says why and how to write it."""


def kind(url: str) -> Kind:
    """The database ``url`` names; GraphURLError for one that names none levers can use."""
    try:
        parts = urlsplit(url)
        port = parts.port  # a port that is not a number raises here
    except ValueError as exc:
        raise GraphURLError(f"{masked(url)} is not a URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme in NEO4J_SCHEMES:
        if parts.username or parts.password:
            raise GraphURLError(
                "a Neo4j URL carries no user or password: set NEO4J_USER and NEO4J_PASSWORD instead"
            )
        found: Kind = "neo4j"
    elif scheme in FALKOR_SCHEMES:
        found = "falkordb"
    else:
        raise GraphURLError(
            f"{masked(url)} names no graph database: use falkor://HOST:PORT (FalkorDB; also "
            "falkors://, redis://, rediss://) or neo4j://HOST:PORT (also neo4j+s://, bolt://)"
        )
    if not parts.hostname or port == 0:
        raise GraphURLError(f"{masked(url)} names no host: {scheme}://HOST:PORT")
    return found


def falkordb_url(url: str) -> str:
    """``url`` as FalkorDB's client takes it (falkordb:// becomes redis://, and so on)."""
    scheme, _, rest = url.partition("://")
    return f"{FALKOR_SCHEMES[scheme.lower()]}://{rest}"


def neo4j_auth(environ: Mapping[str, str] = os.environ) -> tuple[str, str, str]:
    """User, password and database for Neo4j, from NEO4J_USER, NEO4J_PASSWORD, NEO4J_DATABASE."""
    database = environ.get("NEO4J_DATABASE") or DEFAULT_NEO4J_DATABASE
    return environ.get("NEO4J_USER", ""), environ.get("NEO4J_PASSWORD", ""), database


def fix_for(url: str) -> str:
    """What to do when the database at ``url`` does not answer or refuses."""
    if kind(url) == "neo4j":
        return "start the database, check NEO4J_USER / NEO4J_PASSWORD, or fix option graph in pipeline.yaml"
    return "start the server, check the password in the URL, or fix option graph in pipeline.yaml"
