"""The artifact store: each document's bytes and each phase's output, in a local directory.

Layout: ``<root>/<doc id>/source/<name>`` and ``<root>/<doc id>/<phase>.json``. Writes go to a
temporary file first and are renamed into place, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from levers.files import write_atomically


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def put_document(self, doc_id: str, name: str, data: bytes) -> Path:
        path = self.document_path(doc_id, name)
        if not path.exists():
            write_atomically(path, data)
        return path

    def document_path(self, doc_id: str, name: str) -> Path:
        return self.root / doc_id / "source" / Path(name).name

    def put_output(self, doc_id: str, phase: str, output: Any) -> Path:
        path = self.root / doc_id / f"{phase}.json"
        write_atomically(path, json.dumps(output, ensure_ascii=False).encode())
        return path

    def output(self, doc_id: str, phase: str) -> Any:
        """A phase's stored output; FileNotFoundError if it has none."""
        return json.loads((self.root / doc_id / f"{phase}.json").read_bytes())

    def has_output(self, doc_id: str, phase: str) -> bool:
        return (self.root / doc_id / f"{phase}.json").exists()
