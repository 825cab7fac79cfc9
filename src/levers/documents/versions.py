"""Versions of a document: the contents submitted under one name, in the order they came.

A document's id is a hash of its content, so a changed file is a new document. Submitted under a
name seen before, with other content than that name's latest version, it is the name's next
version (numbered from 1; content that was an older version comes back as a new number, and runs
again). A phase that keeps what documents say (a knowledge graph) sees each document's
``DocumentVersion`` and, unless older versions are kept, removes what they wrote, so it never
answers from a superseded text; it also writes nothing for a version older than one it wrote.

A file's name is its absolute path as the user named it (report.md in two directories is two
documents); a document submitted in memory's name is the one given with it. The versions of a
name are one Redis hash (keys.versions): ``name``, ``latest`` (the newest number), ``latest_id``
and, per number, the version as JSON (id, content hash, when, kept); the last MAX_VERSIONS stay.

Past ``retention`` (levers.documents.retention), a version's record expires and so does its entry;
once the name's latest version expires, its hash and its place among the names go, and one field
of a hash of all such names (keys.version_latest: the name's digest -> its latest number and id,
about 80 bytes) keeps the numbering going: Redis holds a bounded amount per name whatever the traffic.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import redis
from redis.commands.core import Script

from levers import keys

# Versions listed per name; older ones are forgotten (their numbers are never given again).
MAX_VERSIONS = 100

# KEYS: the name's versions hash, the set of names, the latest numbers of expired names. ARGV:
# name, document id, the version as JSON, MAX_VERSIONS, the name's digest. Returns {number, 1} for
# a new version; {number, 0} when the document is the name's latest version already. One script,
# so two submitters of one name never get the same number.
_ADD = """
local latest = tonumber(redis.call('HGET', KEYS[1], 'latest') or '0') or 0
local latest_id = redis.call('HGET', KEYS[1], 'latest_id')
if latest == 0 then
  local kept = redis.call('HGET', KEYS[3], ARGV[5]) or ''
  local number, id = string.match(kept, '^(%d%d?%d?%d?%d?%d?%d?%d?%d?):(.*)$')
  if number then latest, latest_id = tonumber(number), id end
end
if latest > 0 and latest_id == ARGV[2] then return {latest, 0} end
latest = latest + 1
redis.call('HSET', KEYS[1], 'name', ARGV[1], 'latest', latest, 'latest_id', ARGV[2])
redis.call('HSET', KEYS[1], tostring(latest), ARGV[3])
if latest > tonumber(ARGV[4]) then redis.call('HDEL', KEYS[1], tostring(latest - tonumber(ARGV[4]))) end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[5])
return {latest, 1}
"""

# A Lua function for a script that expires records (levers.documents.retention), so that a version
# goes in the same step as its record: forget(the name's versions hash, the set of names, the
# latest numbers of expired names, name, the document's id, its number, the name's digest). The
# name's latest version leaves its number and id behind ("3:<id>": the same content again is still
# its latest) and nothing else; an older one, its own entry.
FORGET_LUA = """
local function forget(versions, names, latest, name, id, number, digest)
  if redis.call('HGET', versions, 'latest_id') == id then
    redis.call('HSET', latest, digest, redis.call('HGET', versions, 'latest') .. ':' .. id)
    redis.call('DEL', versions)
    redis.call('SREM', names, name)
  else
    redis.call('HDEL', versions, number)
  end
end
"""

_scripts: weakref.WeakKeyDictionary[redis.Redis, Script] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class DocumentVersion:
    """Which version of which name a document is, as phases see it (``Document.version``)."""

    name: str
    number: int
    keep: bool = False  # older versions stay (submitted with --keep-versions)


@dataclass(frozen=True)
class VersionEntry:
    """One version of a name, for `levers show NAME`."""

    number: int
    id: str
    hash: str  # the content's SHA-256
    submitted: float
    keep: bool


def version_name(source: str, in_memory: bool) -> str:
    """The name whose versions a submitted document joins: a file's absolute path, not resolved
    (where the user sees it), or the name given with a document held in memory."""
    return source if in_memory else os.path.abspath(source)


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name_digest(name: str) -> str:
    return hashlib.sha256(name.encode(errors="surrogateescape")).hexdigest()[:32]


class Versions:
    def __init__(self, connection: redis.Redis, pipeline: str) -> None:
        self.connection = connection
        self.pipeline = pipeline

    def add(self, name: str, doc_id: str, data_hash: str, keep: bool) -> tuple[DocumentVersion, bool]:
        """Record ``doc_id`` as a version of ``name``; the version, and whether it is a new one
        (False: the document is the name's latest version already, which keeps its number)."""
        entry = json.dumps({"id": doc_id, "hash": data_hash, "at": time.time(), "keep": keep})
        if self.connection not in _scripts:
            _scripts[self.connection] = self.connection.register_script(_ADD)
        number, new = _scripts[self.connection](
            keys=self._keys(name), args=[name, doc_id, entry, MAX_VERSIONS, name_digest(name)]
        )
        return DocumentVersion(name, int(number), keep), bool(new)

    def _keys(self, name: str) -> list[str]:
        return [
            keys.versions(self.pipeline, name_digest(name)),
            keys.version_names(self.pipeline),
            keys.version_latest(self.pipeline),
        ]

    def entries(self, name: str) -> list[VersionEntry]:
        """The versions of ``name`` still listed, oldest first."""
        raw = self.connection.hgetall(keys.versions(self.pipeline, name_digest(name)))
        found = (_entry(k, v) for k, v in raw.items())
        return sorted((e for e in found if e is not None), key=lambda e: e.number)

    def named(self, given: str) -> str | None:
        """The name with versions that ``given`` is, or the absolute path it names is; None if none."""
        names_key = keys.version_names(self.pipeline)
        candidates = list(dict.fromkeys([given, os.path.abspath(given)]))
        found = self.connection.smismember(names_key, candidates)
        return next((name for name, known in zip(candidates, found, strict=True) if known), None)

    def with_file_name(self, given: str) -> list[str]:
        """Every name with versions whose file name ``given`` is (report.md for /docs/report.md).
        Reads every name: for `levers show`, not for a loop."""
        found = (_text(n) for n in self.connection.sscan_iter(keys.version_names(self.pipeline), count=1000))
        return sorted(n for n in found if os.path.basename(n) == given)


def _text(value: bytes | str) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else value


def _entry(number: bytes | str, value: bytes | str) -> VersionEntry | None:
    """A version as stored; None for the hash's other fields or anything that is not one."""
    if not _text(number).isdigit():
        return None
    try:
        data: Any = json.loads(value)
        return VersionEntry(
            int(_text(number)), str(data["id"]), str(data["hash"]), float(data["at"]), bool(data["keep"])
        )
    except (ValueError, TypeError, KeyError):
        return None
