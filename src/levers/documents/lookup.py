"""Finding what `levers show` shows: one document by id or id prefix, with its stored outputs, or
the versions of a document name."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from levers.documents.history import with_history
from levers.documents.ledger import DocumentRecord, Ledger
from levers.documents.store import project_store
from levers.documents.versions import VersionEntry, Versions
from levers.errors import UsageError
from levers.safe import unshown
from levers.server.project import Project, open_project

# Names listed when a file name stands for several documents.
AMBIGUOUS_SHOWN = 5
# What may be a document id or the start of one (hex digits): looked up as one first.
_ID = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class VersionRow:
    """One version of a name, with the status of its document (None: no record of it left)."""

    entry: VersionEntry
    status: str | None
    replaced_by: int | None  # the first newer version that replaced it, if one did


@dataclass(frozen=True)
class NameVersions:
    name: str
    versions: list[VersionRow]


def show_view(file: Path | None, given: str) -> tuple[DocumentRecord, dict[str, Any]] | NameVersions:
    """The versions of the name ``given`` is (or the path it names), else the document whose id
    ``given`` is or starts, else the versions of the name whose file name ``given`` is."""
    project = open_project(file, last_good=True)
    versions = Versions(project.connection, project.loaded.outline.name)
    given = _as_typed(versions, given)
    named = versions.named(given)
    if named is not None:
        return name_versions(project, named)
    if _ID.match(given) and Ledger(project.connection, project.loaded.outline.name).find(given):
        return document_view(project, given)
    names = versions.with_file_name(given)
    if len(names) > 1:
        listed = ", ".join(names[:AMBIGUOUS_SHOWN]) + (", ..." if len(names) > AMBIGUOUS_SHOWN else "")
        raise UsageError(
            f"{given!r} is the file name of {len(names)} documents ({listed})", fix="give its path"
        )
    if names:
        return name_versions(project, names[0])
    return document_view(project, given)


def _as_typed(versions: Versions, given: str) -> str:
    """``given``, or the name it spells as levers shows names (a newline as \\n), when no name is
    ``given`` itself: a name with control characters can only be typed in its escaped form."""
    plain = unshown(given)
    if plain == given or versions.named(given) is not None or versions.with_file_name(given):
        return given
    return plain


def name_versions(project: Project, name: str) -> NameVersions:
    pipeline = project.loaded.outline.name
    entries = Versions(project.connection, pipeline).entries(name)
    records = Ledger(project.connection, pipeline).get_many([e.id for e in entries])
    rows = []
    for entry, record in zip(entries, records, strict=True):
        replaced_by = next((e.number for e in entries if e.number > entry.number and not e.keep), None)
        rows.append(VersionRow(entry, record.status.value if record else None, replaced_by))
    return NameVersions(name, rows)


def document_view(project: Project, prefix: str) -> tuple[DocumentRecord, dict[str, Any]]:
    ledger = Ledger(project.connection, project.loaded.outline.name)
    matches = ledger.find(prefix)
    if not matches:
        raise UsageError(f"no document with id or name {prefix!r}", fix="ids are printed by `levers submit`")
    if len(matches) > 1:
        raise UsageError(f"id prefix {prefix!r} matches {len(matches)} documents", fix="give more of the id")
    record = ledger.get(matches[0])
    if record is None:
        raise UsageError(f"document {matches[0]} has no record")
    store = project_store(project.loaded)
    record = with_history(store, record)
    outputs = {p: store.output(record.id, p) for p in record.phases if store.has_output(record.id, p)}
    return record, outputs
