"""Opening the pipeline a command works on: its file, its Redis, and its connection.

The file is ``-f FILE``, else LEVERS_FILE, else ./pipeline.yaml (command line over environment
over default, as for every setting).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import redis

from levers.connection import Target, connect, embedded_server, resolve
from levers.loading import LoadedPipeline, load_pipeline

DEFAULT_FILE = "pipeline.yaml"


def pipeline_path(given: Path | None) -> Path:
    return given or Path(os.environ.get("LEVERS_FILE") or DEFAULT_FILE)


@dataclass(frozen=True)
class Project:
    loaded: LoadedPipeline
    target: Target
    connection: redis.Redis
    started_server: bool  # this command started the embedded server

    @property
    def state_dir(self) -> Path:
        return self.loaded.project_dir / ".levers"


def open_project(given: Path | None, check_imports: bool = False, start: bool = True) -> Project:
    """Load the pipeline and connect to its Redis, starting the embedded server if it is the one."""
    loaded = load_pipeline(pipeline_path(given), check_imports=check_imports)
    was_running = embedded_server(loaded).running() is not None
    target = resolve(loaded, start=start)
    return Project(loaded, target, connect(target), started_server=target.embedded and not was_running)
