"""A done document's history, kept in the artifact store too, for when its record expires.

When a document's last phase finishes, its worker writes the document's record as it stands
(every phase's start, seconds, attempts and the hosts lost while it ran) to
the store as the output of HISTORY (a name no phase can have: ``<doc id>/.record.json``). Past
``retention`` the record in Redis goes, and `levers show` shows the document from there.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

from levers.documents.ledger import DocStatus, DocumentRecord, PhaseRecord
from levers.documents.store import ArtifactStore
from levers.documents.versions import DocumentVersion

# Stored as if it were a phase's output: phase names start with a letter.
HISTORY = ".record"


def store_history(
    store: ArtifactStore, record: DocumentRecord, phase: str, seconds: float, reused: bool = False
) -> None:
    """Store the history of ``record`` (as its attempt of ``phase``, the last, started) once that
    phase finished in ``seconds`` (``reused``: with a stored result)."""
    phases = dict(record.phases)
    ran = phases.get(phase, PhaseRecord(None, None, 0, None))
    phases[phase] = replace(ran, seconds=round(seconds, 4), error=None, reused=reused)
    done = replace(record, status=DocStatus.DONE, finished=time.time(), phases=phases)
    store.put_output(record.id, HISTORY, asdict(done))


def with_history(store: ArtifactStore, record: DocumentRecord) -> DocumentRecord:
    """``record``, or for one that expired, the history the store keeps of it (when it does)."""
    stored = read_history(store, record.id) if record.expired else None
    return record if stored is None else replace(stored, expired=True)


def read_history(store: ArtifactStore, doc_id: str) -> DocumentRecord | None:
    """The history stored for ``doc_id``; None when there is none or it does not read as one."""
    try:
        return _record(store.output(doc_id, HISTORY))
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None


def _record(data: dict[str, Any]) -> DocumentRecord:
    phases = {str(name): PhaseRecord(**run) for name, run in dict(data["phases"]).items()}
    names = [str(n) for n in data.get("names", [])]
    return DocumentRecord(
        id=str(data["id"]),
        name=str(data["name"]),
        input=str(data["input"]),
        status=DocStatus(data["status"]),
        phase=str(data["phase"]),
        submitted=float(data["submitted"]),
        finished=float(data["finished"]) if data.get("finished") is not None else None,
        error=None,
        phases=phases,
        names=names,
        version=DocumentVersion(**data["version"]) if data.get("version") else None,
    )
