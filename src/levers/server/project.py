"""Opening the pipeline a command works on (levers.server.pipeline_file): its file, its Redis,
and its connection."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import redis

from levers.errors import SpecError, UsageError
from levers.files import make_state_dir, write_atomically
from levers.pipeline.loading import LoadedPipeline, load_pipeline, state_dir_of
from levers.server.connection import Target, checked_url, connect, embedded_server, resolve
from levers.server.pipeline_file import pipeline_path, published_only


@dataclass(frozen=True)
class Project:
    loaded: LoadedPipeline
    target: Target
    connection: redis.Redis
    started_server: bool  # this command started the embedded server
    file_error: str | None = None  # pipeline.yaml is invalid; ``loaded`` is the last good version

    @property
    def state_dir(self) -> Path:
        return self.loaded.state_dir


def open_project(
    given: Path | None, check_imports: bool = False, start: bool = False, last_good: bool = False
) -> Project:
    """Load the pipeline and connect to its Redis. With ``start``, the embedded server is started
    if it is the one and does not run; without, its absence is a ConnectionFailed (commands that
    only read never start a server).

    With ``last_good``, an invalid file falls back to the version the supervisor last applied,
    so commands that only look (status, show) keep working while the file is being fixed.
    """
    path = pipeline_path(given)
    try:
        loaded = load_pipeline(path, check_imports=check_imports)
        file_error = None
    except SpecError as exc:
        fallback = read_last_good(path) if last_good else None
        if fallback is None:
            raise
        loaded, file_error = fallback, str(exc)
    # only a command that may start the server asks first whether it runs (a read asks once, below)
    was_running = start and embedded_server(loaded, start=False).running() is not None
    target = resolve(loaded, start=start)
    started = target.embedded and not was_running
    return Project(loaded, target, connect(target), started_server=started, file_error=file_error)


def published_target(url: str) -> Target:
    return Target(url=checked_url(url, "REDIS_URL"), embedded=False)


def open_anywhere(given: Path | None, pipeline: str | None = None) -> Project:
    """A project for a command that only looks: its pipeline file's (the last good version while
    the file is invalid), or without one, the version published on REDIS_URL (``pipeline`` names
    which, when several are), validated as a file would be."""
    url = published_only(given)
    return open_project(given, last_good=True) if url is None else open_published(url, pipeline)


def open_published(url: str, pipeline: str | None) -> Project:
    """The newest version of the pipeline published on ``url`` (``pipeline``, else the only one
    there), validated as a file would be (not its handlers: this host may not run them)."""
    from levers.pipeline.published import loaded_from, published_name, read_published

    target = published_target(url)
    connection = connect(target)
    name = published_name(connection, pipeline)
    published = read_published(connection, name)
    if published is None:
        raise UsageError(f"no version of pipeline {name!r} is published on this server",
                         fix="name one with --pipeline NAME, or run where its pipeline.yaml is")  # fmt: skip
    named = Path(f"pipeline.yaml (published {published.version.label})")  # as errors name it
    loaded = loaded_from(published, named, name, check_imports=False)
    return Project(loaded, target, connection, started_server=False)


def last_good_path(pipeline: Path) -> Path:
    return state_dir_of(pipeline) / "last-good-pipeline.json"


def save_last_good(loaded: LoadedPipeline) -> None:
    """Keep the version a supervisor applies, for commands run while the file is invalid."""
    # what the file gave only: a dump of every field does not validate again (``expect`` holds
    # either seconds or calls, and a full dump has both)
    saved = {"digest": loaded.digest, "spec": loaded.spec.model_dump(mode="json", exclude_unset=True)}
    make_state_dir(loaded.state_dir)
    write_atomically(last_good_path(loaded.path), json.dumps(saved).encode())


def read_last_good(pipeline: Path) -> LoadedPipeline | None:
    from levers.pipeline.model import Pipeline

    try:
        saved = json.loads(last_good_path(pipeline).read_text())
        spec = Pipeline.model_validate(saved["spec"])
    except (OSError, ValueError, KeyError):
        return None
    return LoadedPipeline(path=pipeline.resolve(), spec=spec, digest=str(saved["digest"]))
