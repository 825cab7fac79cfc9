"""levers: a phased document pipeline on RQ workers, its parallelism declared in pipeline.yaml.

The public API for phase code and applications is what this module exports. Its names load on
first use, so a command that imports one levers module (``levers status``) does not pay for the
worker's.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from levers.documents.versions import DocumentVersion
    from levers.errors import ConnectionFailed, LeversError
    from levers.limits.shared import RateLimited, SharedLimit, UnknownLimit, is_rate_limited, retry_delay
    from levers.pipeline.options import PhaseOptions
    from levers.server.embedded import EmbeddedServer
    from levers.server.masking import masked
    from levers.worker.phase_context import Document, Handler, Levers, Permanent, PhaseContext, batch_handler

__all__ = [
    "ConnectionFailed",
    "Document",
    "DocumentVersion",
    "EmbeddedServer",
    "Handler",
    "Levers",
    "LeversError",
    "Permanent",
    "PhaseContext",
    "PhaseOptions",
    "RateLimited",
    "SharedLimit",
    "UnknownLimit",
    "batch_handler",
    "is_rate_limited",
    "masked",
    "retry_delay",
    "submit_bytes",
]

# What phase code and applications use, and the module each comes from. Phase code imports these
# from ``levers`` and nothing else of levers.
_EXPORTS = {
    # a handler's inputs, its options model, and the error no retry can fix
    "Document": "levers.worker.phase_context",
    "DocumentVersion": "levers.documents.versions",
    "Handler": "levers.worker.phase_context",
    "Levers": "levers.worker.phase_context",
    "PhaseContext": "levers.worker.phase_context",
    "PhaseOptions": "levers.pipeline.options",
    "Permanent": "levers.worker.phase_context",
    "batch_handler": "levers.worker.phase_context",
    # shared limits (ctx.limit) and retrying a provider that says "too many requests"
    "SharedLimit": "levers.limits.shared",
    "UnknownLimit": "levers.limits.shared",
    "RateLimited": "levers.limits.shared",
    "is_rate_limited": "levers.limits.shared",
    "retry_delay": "levers.limits.shared",
    # a phase's own server, started and kept like levers' embedded Redis
    "EmbeddedServer": "levers.server.embedded",
    # errors the CLI reports as one line (ConnectionFailed: a server that does not answer, exit 1)
    "LeversError": "levers.errors",
    "ConnectionFailed": "levers.errors",
    # a URL fit to print: its password replaced by ***
    "masked": "levers.server.connection",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'levers' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def submit_bytes(
    data: bytes, name: str, pipeline: str | Path | None = None, force: bool = False, priority: str = "normal",
    keep_versions: bool = False,
    reuse: bool = True,
) -> str:  # fmt: skip
    """Submit a document held in memory (a web upload, say); returns its id.

    The bytes go to the entry phase declared ``input: bytes`` for the name's type and are kept in
    Redis, never written to disk. ``priority`` (high, normal or low) is the document's lane in
    every phase. Other content under a name submitted before is a new version of it, which
    replaces what the older versions wrote unless ``keep_versions``. Without ``reuse`` every
    phase does the work even where a stored result of the same input, code and settings would
    do. Raises ``levers.errors.LeversError`` on bad input.
    """
    from levers.documents.submission import Submitter
    from levers.server.project import open_project

    project = open_project(Path(pipeline) if pipeline else None, start=True, last_good=True)
    submitter = Submitter(project.loaded, project.connection)
    outcome = submitter.submit_bytes(
        data, name, force, priority=priority, keep_versions=keep_versions, reuse=reuse
    )
    assert outcome.doc_id is not None
    return outcome.doc_id
