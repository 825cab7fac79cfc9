"""Expiring done documents' records past the pipeline's ``retention`` (days).

A done document's id sits in the finished set (keys.finished), scored by when it finished. Past
``retention``, a supervisor's pass deletes its record and moves its id to the expired set
(keys.expired): deduplication's index, a set member of a few dozen bytes per document, so that the
same content submitted again is still skipped (unless forced). The document's version of its name
goes too, leaving at most the name's latest number (levers.documents.versions). Counters (`levers status`) are
totals of their own and do not change; the artifact store keeps the document's outputs and its
history (levers.documents.history), from which `levers show` still shows it.
"""

from __future__ import annotations

import time
from typing import cast

import redis

from levers import keys
from levers.documents.failures import EXPIRY_EVERY_S
from levers.documents.ledger import DocStatus
from levers.documents.versions import FORGET_LUA, name_digest
from levers.pipeline.model import Pipeline

DAY_S = 86400.0
# Records expired per script call; a pass makes at most EXPIRY_BATCHES calls, so a supervisor's
# tick stays short even when retention is first set on a large backlog (the rest goes next pass).
EXPIRY_BATCH = 500
EXPIRY_BATCHES = 20

# KEYS: the finished set, the expired set, the set of names with versions, the latest numbers of
# expired names, then per document its record and the versions hash of the name it was read to be
# a version of. ARGV: the done status, then per document its id, that name ('' for none) and the
# name's digest. Each document still done loses its record and its version (levers.documents.
# versions) and joins the expired set, in one step; every id leaves the finished set (one
# resubmitted meanwhile is no longer done, and keeps its record). Returns how many expired.
_EXPIRE = (
    FORGET_LUA
    + """
local expired = 0
for i = 0, (#ARGV - 1) / 3 - 1 do
  local id, name, digest = ARGV[2 + 3 * i], ARGV[3 + 3 * i], ARGV[4 + 3 * i]
  local record, versions = KEYS[5 + 2 * i], KEYS[6 + 2 * i]
  if redis.call('HGET', record, 'status') == ARGV[1] then
    local version = redis.call('HMGET', record, 'version_of', 'version')
    if name ~= '' and version[1] == name and version[2] then
      forget(versions, KEYS[3], KEYS[4], name, id, version[2], digest)
    end
    redis.call('DEL', record)
    redis.call('SADD', KEYS[2], id)
    expired = expired + 1
  end
  redis.call('ZREM', KEYS[1], id)
end
return expired
"""
)

# KEYS: the documents set, the finished set, then one record per ARGV[2..]. ARGV: the done status,
# then the ids. Moves each done document to the finished set, scored by when it finished.
_ADOPT = """
local moved = 0
for i = 2, #ARGV do
  local at = redis.call('HMGET', KEYS[i + 1], 'status', 'finished')
  if at[1] == ARGV[1] then
    redis.call('ZADD', KEYS[2], tonumber(at[2]) or 0, ARGV[i])
    redis.call('ZREM', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""


class Retention:
    """Done documents' records of one pipeline, and their expiry."""

    def __init__(self, connection: redis.Redis, spec: Pipeline) -> None:
        self.connection = connection
        self.spec = spec
        self._expire = connection.register_script(_EXPIRE)
        self._adopt = connection.register_script(_ADOPT)

    def expire(self, retention_s: float | None = None, now: float | None = None) -> int:
        """Expire the records of documents done longer ago than ``retention_s`` (default: the
        pipeline's ``retention``; nothing without one); how many. At most EXPIRY_BATCHES batches."""
        if retention_s is None:
            if self.spec.retention is None:
                return 0
            retention_s = self.spec.retention * DAY_S
        cutoff = (time.time() if now is None else now) - retention_s
        finished = keys.finished(self.spec.name)
        expired = 0
        for _ in range(EXPIRY_BATCHES):
            due: list[bytes] = self.connection.zrangebyscore(finished, "-inf", cutoff, 0, EXPIRY_BATCH)  # type: ignore[assignment]
            if not due:
                break
            expired += self._expire_batch([member.decode() for member in due])
        return expired

    def _expire_batch(self, ids: list[str]) -> int:
        """Expire ``ids``' records and their versions in one script: the name each is a version of
        is read first, to name its versions hash (the script checks it is still that name)."""
        name = self.spec.name
        records = [keys.document(name, doc_id) for doc_id in ids]
        with self.connection.pipeline(transaction=False) as pipe:
            for record in records:
                pipe.hget(record, "version_of")
            versions_of = [(v or b"").decode(errors="replace") for v in pipe.execute()]
        script_keys = [
            keys.finished(name),
            keys.expired(name),
            keys.version_names(name),
            keys.version_latest(name),
        ]
        args = [str(DocStatus.DONE)]
        for doc_id, record, version_of in zip(ids, records, versions_of, strict=True):
            digest = name_digest(version_of)
            script_keys += [record, keys.versions(name, digest)]
            args += [doc_id, version_of, digest]
        return int(self._expire(keys=script_keys, args=args))

    def adopt(self) -> int:
        """Move the documents that were done before done ones had a set of their own (they stayed
        among those not done, keys.documents) to the finished set, so they expire too; how many."""
        documents, finished = keys.documents(self.spec.name), keys.finished(self.spec.name)
        moved, cursor = 0, 0
        while True:
            cursor, members = self.connection.zscan(documents, cursor, count=EXPIRY_BATCH)
            ids = [member.decode() for member, _score in cast(list[tuple[bytes, float]], members)]
            if ids:
                records = [keys.document(self.spec.name, doc_id) for doc_id in ids]
                args = [str(DocStatus.DONE), *ids]
                moved += int(self._adopt(keys=[documents, finished, *records], args=args))
            if cursor == 0:
                return moved


class RetentionExpiry:
    """A supervisor's part: every EXPIRY_EVERY_S, expire the records past ``retention``."""

    def __init__(self, connection: redis.Redis) -> None:
        self.connection = connection
        self._last = float("-inf")
        self._adopted: str | None = None  # the pipeline whose older done documents were adopted

    def tick(self, spec: Pipeline) -> int:
        now = time.monotonic()
        if spec.retention is None or now - self._last < EXPIRY_EVERY_S:
            return 0
        self._last = now
        retention = Retention(self.connection, spec)
        if self._adopted != spec.name:
            retention.adopt()
            self._adopted = spec.name
        return retention.expire()
