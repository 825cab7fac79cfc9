"""`levers set` on any host: the edit goes into pipeline.yaml where there is one, and is published
to every supervisor of the pipeline on every host.

Where the file is present it is edited as ever (comments and layout kept, validated with imports
and options, written atomically under its lock), once the result is published. A file that is an
older published version (a `levers set` elsewhere changed the pipeline since) is brought up to
the newest version first, so an edit here never undoes one made elsewhere; content never published
(a hand edit) is published as it is, as a deploy would. Without a file (a laptop with REDIS_URL),
the newest published version itself is edited, validated with the model: a supervisor refuses
what its handlers' options or imports do not accept. A publish is made only over the version the
edit started from: two concurrent `levers set` lose no update.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from levers.errors import LeversError, UsageError
from levers.files import write_atomically
from levers.pipeline.editing import Change, edit_text, file_lock
from levers.pipeline.loading import LoadedPipeline, load_pipeline, parse_pipeline
from levers.pipeline.published import (
    Publication,
    Published,
    Version,
    differences,
    loaded_from,
    publish,
    read_published,
    was_published,
)

# A publish that found a newer version than the edit started from starts again from that one.
ATTEMPTS = 5


@dataclass(frozen=True)
class SetOutcome:
    updated: LoadedPipeline
    changes: list[Change]  # those that changed a value
    publication: Publication | None  # None: not published (no server answers: the file alone)
    caught_up: Version | None = None  # the file was an older version: brought up to this one first
    behind: tuple[str, ...] = ()  # what the file held differently from it


def set_in_file(path: Path, assignments: Sequence[str], connection: redis.Redis, by: str) -> SetOutcome:
    """Edit the pipeline file ``path`` and publish the result on ``connection``. Nothing is
    written or published unless every assignment is valid."""
    with file_lock(path):
        for _ in range(ATTEMPTS):
            text = path.read_text()
            file = load_pipeline(path)
            live = read_published(connection, file.spec.name)
            base = _newer_base(connection, file, live)
            start = base or file
            new_text, changes = edit_text(path, _decoded(start) if base else text, list(start.spec.phases),
                                          assignments)  # fmt: skip
            updated = parse_pipeline(new_text.encode(), path, check_imports=True)
            # over a malformed record or another name's (None): anything, which mends or starts it
            over = live.version.digest if live is not None and updated.spec.name == file.spec.name else None
            publication = publish(connection, updated, by, over=over)
            if publication.outcome == "conflict":
                continue
            if new_text != text:
                # the file keeps its mode: it is the user's, not levers' own state
                write_atomically(path, new_text.encode(), mode=path.stat().st_mode & 0o777)
            caught_up = live.version if base is not None and live is not None else None
            behind = tuple(differences(file.spec, base.spec)) if base is not None else ()
            return SetOutcome(updated, [c for c in changes if c.old != c.new], publication, caught_up, behind)
    raise _kept_changing()


def set_published(connection: redis.Redis, pipeline: str, assignments: Sequence[str], by: str) -> SetOutcome:
    """Edit the newest published version of ``pipeline`` (no file at hand) and publish the result."""
    for _ in range(ATTEMPTS):
        live = read_published(connection, pipeline)
        if live is None:
            raise UsageError(f"no version of pipeline {pipeline!r} is published on this server",
                             fix="run `levers up` where its pipeline.yaml is, or pass -f FILE")  # fmt: skip
        named = Path(f"pipeline.yaml (published {live.version.label})")
        current = loaded_from(live, named, pipeline, check_imports=False)
        new_text, changes = edit_text(named, _decoded(current), list(current.spec.phases), assignments)
        updated = parse_pipeline(new_text.encode(), named)
        if updated.spec.name != pipeline:
            raise UsageError("a pipeline's name cannot change while it runs", fix="leave name: as it is")
        publication = publish(connection, updated, by, over=live.version.digest)
        if publication.outcome != "conflict":
            return SetOutcome(updated, [c for c in changes if c.old != c.new], publication)
    raise _kept_changing()


def _newer_base(
    connection: redis.Redis, file: LoadedPipeline, live: Published | None
) -> LoadedPipeline | None:
    """The newest published version, when the file is an older one (else the file is edited);
    a newest version that is not valid is not built on."""
    if live is None or live.version.digest == file.digest:
        return None
    if was_published(connection, file.spec.name, file.digest) is None:
        return None
    try:
        return loaded_from(live, file.path, file.spec.name, check_imports=False)
    except LeversError:
        return None


def _decoded(loaded: LoadedPipeline) -> str:
    try:
        return (loaded.text or b"").decode()
    except UnicodeDecodeError:  # parsed, so YAML read it: another encoding than UTF-8's
        fix = "publish it again with `levers set`"
        raise UsageError("the published pipeline is not UTF-8", fix=fix) from None


def _kept_changing() -> LeversError:
    return LeversError(f"the published pipeline changed {ATTEMPTS} times while this edit was made",
                       fix="run `levers set` again")  # fmt: skip
