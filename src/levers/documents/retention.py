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
from levers.documents.versions import Versions
from levers.pipeline.model import Pipeline

DAY_S = 86400.0
# Records expired per script call; a pass makes at most EXPIRY_BATCHES calls, so a supervisor's
# tick stays short even when retention is first set on a large backlog (the rest goes next pass).
EXPIRY_BATCH = 500
EXPIRY_BATCHES = 20

# KEYS: the finished set, the expired set, then one record per ARGV[2..]. ARGV: the done status,
# then the ids. Each document still done loses its record and joins the expired set; every id
# leaves the finished set (one resubmitted meanwhile is no longer done, and keeps its record).
# Returns, per expired document, its id, and the name and number it was a version of ('' if none).
_EXPIRE = """
local expired = {}
for i = 2, #ARGV do
  local id = ARGV[i]
  if redis.call('HGET', KEYS[i + 1], 'status') == ARGV[1] then
    local version = redis.call('HMGET', KEYS[i + 1], 'version_of', 'version')
    redis.call('DEL', KEYS[i + 1])
    redis.call('SADD', KEYS[2], id)
    table.insert(expired, id)
    table.insert(expired, version[1] or '')
    table.insert(expired, version[2] or '')
  end
  redis.call('ZREM', KEYS[1], id)
end
return expired
"""

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
        self.versions = Versions(connection, spec.name)
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
            ids = [member.decode() for member in due]
            records = [keys.document(self.spec.name, doc_id) for doc_id in ids]
            script_keys = [finished, keys.expired(self.spec.name), *records]
            gone = self._expire(keys=script_keys, args=[str(DocStatus.DONE), *ids])
            expired += len(gone) // 3
            self._forget_versions(gone)
        return expired

    def _forget_versions(self, gone: list[bytes]) -> None:
        """The versions of the expired documents (id, name, number triples) go with their records."""
        with self.connection.pipeline(transaction=False) as pipe:
            for doc_id, name, number in zip(gone[0::3], gone[1::3], gone[2::3], strict=True):
                if name and number.isdigit():
                    self.versions.forget(
                        name.decode(errors="surrogateescape"), doc_id.decode(), int(number), pipe
                    )
            pipe.execute()

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
