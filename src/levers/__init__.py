"""levers: a phased document pipeline on RQ workers, its parallelism declared in pipeline.yaml.

The public API for phase code and applications is what this module exports.
"""

from __future__ import annotations

from pathlib import Path

from levers.context import Document, Handler, Levers, PhaseContext
from levers.embedded import EmbeddedServer

__all__ = ["Document", "EmbeddedServer", "Handler", "Levers", "PhaseContext", "submit_bytes"]


def submit_bytes(data: bytes, name: str, pipeline: str | Path | None = None, force: bool = False) -> str:
    """Submit a document held in memory (a web upload, say); returns its id.

    The bytes go to the entry phase declared ``input: bytes`` for the name's type and are kept in
    Redis, never written to disk. Raises ``levers.errors.LeversError`` on bad input.
    """
    from levers.project import open_project
    from levers.submission import Submitter

    project = open_project(Path(pipeline) if pipeline else None, start=True, last_good=True)
    outcome = Submitter(project.loaded, project.connection).submit_bytes(data, name, force)
    assert outcome.doc_id is not None
    return outcome.doc_id
