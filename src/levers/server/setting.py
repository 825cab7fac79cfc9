"""`levers set` on any host: the pipeline file where there is one, else the version published on
REDIS_URL (a laptop with no pipeline.yaml), and the Redis the result is published on."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from pathlib import Path

import redis

from levers.errors import LeversError, UsageError
from levers.pipeline.editing import set_values
from levers.pipeline.loading import load_pipeline
from levers.pipeline.published import published_name
from levers.pipeline.publishing import SetOutcome, set_in_file, set_published
from levers.server.connection import connect, connect_if_running
from levers.server.outage import reason
from levers.server.pipeline_file import pipeline_path, published_only
from levers.server.project import published_target


def set_anywhere(
    given: Path | None, assignments: Sequence[str], pipeline: str | None = None
) -> tuple[SetOutcome, redis.Redis | None]:
    """`levers set`: in the pipeline file where there is one (published too when its Redis
    answers); without one, in the version published on REDIS_URL (``pipeline`` names which,
    when several are). Returns the connection it published on, if any."""
    try:
        return _set(given, assignments, pipeline)
    except redis.RedisError as exc:  # one refused or lost after it answered: the file is as it was
        fix = "run `levers set` again"
        raise LeversError(f"could not publish the change: {reason(exc)}", fix=fix) from None


def _set(
    given: Path | None, assignments: Sequence[str], pipeline: str | None
) -> tuple[SetOutcome, redis.Redis | None]:
    path = pipeline_path(given)
    by = f"levers set on {socket.gethostname()}"
    url = published_only(given)
    if url is None:
        if not path.exists() and given is None:
            raise UsageError(f"no pipeline file at {path}", fix="create one, pass -f FILE, or set REDIS_URL "
                             "to change the pipeline published there")  # fmt: skip
        connection = connect_if_running(load_pipeline(path))
        if connection is None:  # the file alone, as on one machine whose server is down
            updated, changes = set_values(path, assignments)
            return SetOutcome(updated, changes, None), None
        return set_in_file(path, assignments, connection, by), connection
    connection = connect(published_target(url))
    return set_published(connection, published_name(connection, pipeline), assignments, by), connection
