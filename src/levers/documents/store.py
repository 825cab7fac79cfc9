"""The artifact store: each document's bytes and each phase's output, in a local directory.

Layout: ``<root>/<doc id>/source/<name>`` and ``<root>/<doc id>/<phase>.json``, and values phases
cache for any document (a transcript by its audio's hash, say) under
``<root>/cache/<namespace>/<first two characters of the key>/<key>.json``. Writes go to a
temporary file first and are renamed into place, so a reader never sees half a file, and two
writers of one key both leave a whole value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from levers.files import write_atomically

CACHE_DIR = "cache"
# Namespaces and keys become path parts: nothing that could climb out of the store or hide.
_CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


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

    def cached(self, namespace: str, key: str) -> Any:
        """The value ``put_cached`` stored under (namespace, key), or None; an unreadable entry is
        a miss, since a cache only saves work."""
        path = self._cache_path(namespace, key)
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None

    def put_cached(self, namespace: str, key: str, value: Any) -> None:
        """Store a JSON value where every worker that shares this store finds it."""
        write_atomically(self._cache_path(namespace, key), json.dumps(value, ensure_ascii=False).encode())

    def _cache_path(self, namespace: str, key: str) -> Path:
        for name in (namespace, key):
            if not _CACHE_NAME.fullmatch(name):
                raise ValueError(f"cache namespaces and keys are letters, digits, - and _: not {name!r}")
        # sharded, so that no directory grows to millions of entries
        return self.root / CACHE_DIR / namespace / key[:2] / f"{key}.json"
