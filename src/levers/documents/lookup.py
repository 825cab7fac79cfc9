"""Finding one document by id or id prefix, with its stored outputs, for `levers show`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from levers.documents.history import with_history
from levers.documents.ledger import DocumentRecord, Ledger
from levers.documents.store import project_store
from levers.errors import UsageError
from levers.server.project import open_project


def document_view(file: Path | None, prefix: str) -> tuple[DocumentRecord, dict[str, Any]]:
    project = open_project(file, last_good=True)
    spec = project.loaded.spec
    ledger = Ledger(project.connection, spec.name)
    matches = ledger.find(prefix)
    if not matches:
        raise UsageError(f"no document with id {prefix!r}", fix="ids are printed by `levers submit`")
    if len(matches) > 1:
        raise UsageError(f"id prefix {prefix!r} matches {len(matches)} documents", fix="give more of the id")
    record = ledger.get(matches[0])
    if record is None:
        raise UsageError(f"document {matches[0]} has no record")
    store = project_store(project.loaded)
    record = with_history(store, record)
    outputs = {p: store.output(record.id, p) for p in record.phases if store.has_output(record.id, p)}
    return record, outputs
