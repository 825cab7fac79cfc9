"""The pipeline published in Redis: the version every supervisor of it follows, on every host.

A version is the bytes of a pipeline file, numbered (one more per publish, never reused) and named
by their SHA-256. `levers set` publishes the file it edited; a supervisor publishes its own file
when it starts with content never published before (a deploy of a changed file) and follows the
newest version otherwise. Redis is not trusted: a version is used only once its bytes match
its hash and pass the same validation as the file (``loaded_from``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import redis

from levers import keys
from levers.errors import UsageError
from levers.pipeline.loading import MAX_FILE_BYTES, LoadedPipeline, parse_pipeline

if TYPE_CHECKING:
    from levers.pipeline.model import Pipeline

# Digests remembered, to tell an older copy of the file from a new one (about 100 bytes each).
KEPT_VERSIONS = 1000

Outcome = Literal["published", "same", "older", "conflict"]
_OUTCOMES: dict[str, Outcome] = {
    "published": "published", "same": "same", "older": "older", "conflict": "conflict",
}  # fmt: skip


@dataclass(frozen=True)
class Version:
    number: int
    digest: str

    @property
    def label(self) -> str:
        return f"v{self.number} {self.digest[:8]}"


@dataclass(frozen=True)
class Published:
    version: Version
    text: bytes
    by: str  # who published it, as it said


@dataclass(frozen=True)
class Publication:
    version: Version  # the newest version after the publish
    # published; the same content was the newest; an older version's, or the newest was not the
    # one expected (nothing published)
    outcome: Outcome


# One step: a version is numbered, recorded and made the newest, or nothing happens. With
# ARGV[4] = 1 (a supervisor's start), content published before is not published again; with
# ARGV[7] other than '-', only over the newest version of that digest ('' for none).
_PUBLISH = """
local live = redis.call('HMGET', KEYS[1], 'number', 'digest')
local top = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
local number = math.max(tonumber(live[1]) or 0, tonumber(top[2]) or 0)
local current = live[2] or ''
if current == ARGV[1] then return {number, 'same', ARGV[1]} end
if ARGV[7] ~= '-' and current ~= ARGV[7] then return {number, 'conflict', current} end
if ARGV[4] == '1' and number > 0 and redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return {number, 'older', current}
end
number = number + 1
redis.call('HSET', KEYS[1], 'number', number, 'digest', ARGV[1], 'text', ARGV[2], 'by', ARGV[3])
redis.call('ZADD', KEYS[2], number, ARGV[1])
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -tonumber(ARGV[6]) - 1)
redis.call('SADD', KEYS[3], ARGV[5])
return {number, 'published', ARGV[1]}
"""


def publish(
    connection: redis.Redis, loaded: LoadedPipeline, by: str, only_if_new: bool = False,
    over: str | None = None,
) -> Publication:  # fmt: skip
    """Make ``loaded`` (read from its bytes: it has its text) the newest version; with
    ``only_if_new``, unless its content was published before; with ``over``, only if the newest
    version is still the one of that digest ('' for none: a `levers set` does not lose a
    concurrent one)."""
    assert loaded.text is not None, "only a version read from its bytes can be published"
    name = loaded.spec.name
    number, outcome, digest = connection.eval(
        _PUBLISH, 3, keys.published_pipeline(name), keys.published_versions(name), keys.PUBLISHED_PIPELINES,
        loaded.digest, loaded.text, by, "1" if only_if_new else "0", name, str(KEPT_VERSIONS),
        "-" if over is None else over,
    )  # fmt: skip
    return Publication(Version(int(number), _text(digest)), _OUTCOMES[_text(outcome)])


def live_version(connection: redis.Redis, pipeline: str) -> Version | None:
    """The newest version's number and digest (one round trip; None when none is published, or
    what Redis holds is malformed)."""
    number, digest = connection.hmget(keys.published_pipeline(pipeline), ["number", "digest"])
    return _version(number, digest)


# The newest version in one step (a publish in between would pair one version's number with
# another's bytes); bytes past the file's size cap are not even sent.
_READ = """
local size = redis.call('HSTRLEN', KEYS[1], 'text')
local head = redis.call('HMGET', KEYS[1], 'number', 'digest', 'by')
local text = false
if size > 0 and size <= tonumber(ARGV[1]) then text = redis.call('HGET', KEYS[1], 'text') end
return {head[1], head[2], head[3], text}
"""


def read_published(connection: redis.Redis, pipeline: str) -> Published | None:
    """The newest version with its bytes; None when none is published or the record is malformed."""
    key = keys.published_pipeline(pipeline)
    number, digest, by, text = connection.eval(_READ, 1, key, str(MAX_FILE_BYTES))
    version = _version(number, digest)
    if version is None or text is None:
        return None
    return Published(version, bytes(text), _text(by or b"?")[:200])


def was_published(connection: redis.Redis, pipeline: str, digest: str) -> int | None:
    """The number a content was published as (one of the last KEPT_VERSIONS), or None."""
    score = connection.zscore(keys.published_versions(pipeline), digest)
    return int(score) if score is not None else None


def published_pipelines(connection: redis.Redis) -> list[str]:
    """The names of the pipelines published on this server."""
    return sorted(_text(name) for name in connection.smembers(keys.PUBLISHED_PIPELINES))


def published_name(connection: redis.Redis, pipeline: str | None) -> str:
    """The published pipeline a command without a pipeline file works on: ``pipeline``, else the
    only one published on this server."""
    if pipeline is not None:
        return pipeline
    names = published_pipelines(connection)
    if len(names) == 1:
        return names[0]
    if not names:
        raise UsageError("no pipeline file at pipeline.yaml, and none is published on this server",
                         fix="run `levers up` where its pipeline.yaml is, or pass -f FILE")  # fmt: skip
    shown = ", ".join(name[:60] for name in names[:10])
    raise UsageError(f"{len(names)} pipelines are published on this server ({shown})",
                     fix="name one with --pipeline NAME")  # fmt: skip


def loaded_from(published: Published, path: Path, name: str | None, check_imports: bool) -> LoadedPipeline:
    """A published version validated as the file ``path`` would be (UsageError or SpecError
    otherwise): its bytes must match its hash and, with ``name``, it must be that pipeline's.
    ``check_imports``: its handlers must import and its options pass their models, as for a run."""
    label = published.version.label
    if hashlib.sha256(published.text).hexdigest() != published.version.digest:
        raise UsageError(f"published version {label}: its content does not match its hash",
                         fix="publish it again with `levers set`")  # fmt: skip
    loaded = parse_pipeline(published.text, path, check_imports=check_imports)
    if name is not None and loaded.spec.name != name:
        raise UsageError(f"published version {label} names pipeline {loaded.spec.name!r}, not {name!r}",
                         fix="a pipeline's name cannot change while it runs")  # fmt: skip
    return loaded


def differences(file: Pipeline, live: Pipeline) -> list[str]:
    """Every setting the file and the live version hold differently, one line each:
    ``chunking.semaphore: 10 in pipeline.yaml, 15 live``. ``redis:`` is left out: it is each
    host's own, and may hold a password."""
    before, after = _flat(file.model_dump(mode="json")), _flat(live.model_dump(mode="json"))
    paths = [*before, *(path for path in after if path not in before)]
    return [f"{_short(path)}: {_shown(before.get(path))} in pipeline.yaml, {_shown(after.get(path))} live"
            for path in paths
            if path != "redis" and before.get(path, _ABSENT) != after.get(path, _ABSENT)]  # fmt: skip


_ABSENT = object()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        flat: dict[str, Any] = {}
        for key, value in node.items():
            flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: node}


def _short(path: str) -> str:
    """``phases.chunking.levers.semaphore`` as `levers set` takes it: ``chunking.semaphore``."""
    parts = path.split(".")
    if len(parts) == 4 and parts[0] == "phases" and parts[2] == "levers":
        return f"{parts[1]}.{parts[3]}"
    return ".".join(parts[1:]) if parts[0] == "phases" and len(parts) > 2 else path


def _shown(value: Any) -> str:
    if value is None:
        return "unset"
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _version(number: bytes | str | None, digest: bytes | str | None) -> Version | None:
    try:
        parsed = int(number) if number is not None else 0
    except ValueError:
        return None
    text = _text(digest) if digest is not None else ""
    if parsed < 1 or len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        return None
    return Version(parsed, text)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)
