"""The artifact store: each document's bytes and each phase's output, where every worker finds them.

``store:`` in pipeline.yaml names it: a directory (relative to the file; the default) or an
object-store URL (``s3://bucket/prefix``, ``gs://``, ``az://``; documents/object_store.py). Either
way the layout is ``<doc id>/source/<name>`` and ``<doc id>/<phase>.json``, and values phases cache
for any document (a transcript by its audio's hash, say) go under
``cache/<namespace>/<first two characters of the key>/<key>.json``. A document's id is the hash of
its bytes and a cache key the hash of what it was made from, so what is stored under either never
changes: it is written once. A phase's output is written again when the phase runs again.
"""

from __future__ import annotations

import json
import multiprocessing
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

from levers.errors import StoreError
from levers.files import write_atomically

if TYPE_CHECKING:
    from levers.pipeline.loading import LoadedPipeline

T = TypeVar("T")
CACHE_DIR = "cache"
# Namespaces and keys become path parts: nothing that could climb out of the store or hide.
_CACHE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# A document id as levers makes them (ID_HEX_DIGITS hex digits of a hash, documents/routing.py):
# only such a name is a document's directory.
DOC_ID = re.compile(r"[0-9a-f]{20}")


class ArtifactStore(Protocol):
    """What levers asks of a store, local or remote."""

    def put_document(self, doc_id: str, name: str, data: bytes) -> None: ...

    def has_document(self, doc_id: str, name: str) -> bool: ...

    def document_file(self, doc_id: str, name: str) -> Path:
        """A local file holding the document's bytes, for the phase that reads it."""
        ...

    def release(self, path: Path) -> None:
        """The phase is done with a file ``document_file`` gave."""
        ...

    def put_output(self, doc_id: str, phase: str, output: Any) -> None: ...

    def output(self, doc_id: str, phase: str) -> Any:
        """A phase's stored output; FileNotFoundError if it has none."""
        ...

    def has_output(self, doc_id: str, phase: str) -> bool: ...

    def cached(self, namespace: str, key: str) -> Any:
        """The value ``put_cached`` stored under (namespace, key), or None; an unreadable entry is
        a miss, since a cache only saves work."""
        ...

    def put_cached(self, namespace: str, key: str, value: Any) -> None:
        """Store a JSON value where every worker that shares this store finds it."""
        ...

    def remove_document(self, doc_id: str) -> None:
        """Everything stored for the document: its bytes and its outputs."""
        ...


def open_store(location: str, project_dir: Path, state_dir: Path, patient: bool = True) -> ArtifactStore:
    """The store ``location`` (pipeline.yaml's ``store:``) names. ``patient``: a remote store's
    calls retry for up to a minute (a worker's job waits a short outage out); commands pass False
    and fail within seconds."""
    if is_url(location):
        from levers.documents.object_store import ObjectStore

        return ObjectStore(location, state_dir / "downloads", patient)
    return LocalStore(project_dir / location)


def project_store(loaded: LoadedPipeline) -> ArtifactStore:
    """The store of a command's pipeline (read from its settings: `levers show` loads no model)."""
    return open_store(loaded.settings["store"], loaded.project_dir, loaded.state_dir, patient=False)


def is_url(location: str) -> bool:
    return "://" in location


def apart_from_forks(location: str, work: Callable[[], T]) -> T:
    """``work()`` (which uses the store at ``location``), run in a child process when the store is
    remote. The object-store client's runtime does not survive a fork: once a process has used it,
    the workers it forks later hang on their first call. A supervisor forks workers for as long as
    it runs, so it (and `levers run`, which is one) leaves such calls to a short-lived child."""
    if not is_url(location):
        return work()
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)

    def child() -> None:
        try:
            sending.send((True, work()))
        except BaseException as exc:
            sending.send((False, exc))

    process = context.Process(target=child, name="levers-store")
    process.start()
    sending.close()
    try:
        ok, value = receiving.recv()
    except EOFError:
        raise StoreError(f"artifact store {location}: the process using it died") from None
    finally:
        process.join()
    if not ok:
        raise value
    return cast(T, value)


def cache_key_path(namespace: str, key: str) -> str:
    """Where a cached value lives, relative to the store's root."""
    for name in (namespace, key):
        if not _CACHE_NAME.fullmatch(name):
            raise ValueError(f"cache namespaces and keys are letters, digits, - and _: not {name!r}")
    # sharded, so that no directory grows to millions of entries
    return f"{CACHE_DIR}/{namespace}/{key[:2]}/{key}.json"


def as_json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode()


def source_path(doc_id: str, name: str) -> str:
    return f"{doc_id}/source/{Path(name).name}"


def output_path(doc_id: str, phase: str) -> str:
    return f"{doc_id}/{phase}.json"


class LocalStore:
    """A store in a local directory (or one every host mounts). Writes go to a temporary file
    first and are renamed into place, so a reader never sees half a file, and two writers of one
    key both leave a whole value."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def put_document(self, doc_id: str, name: str, data: bytes) -> None:
        path = self.root / source_path(doc_id, name)
        if not path.exists():
            write_atomically(path, data)

    def has_document(self, doc_id: str, name: str) -> bool:
        return (self.root / source_path(doc_id, name)).exists()

    def document_file(self, doc_id: str, name: str) -> Path:
        return self.root / source_path(doc_id, name)

    def release(self, path: Path) -> None:
        """Nothing to do: the file is the store's own."""

    def put_output(self, doc_id: str, phase: str, output: Any) -> None:
        write_atomically(self.root / output_path(doc_id, phase), as_json(output))

    def output(self, doc_id: str, phase: str) -> Any:
        return json.loads((self.root / output_path(doc_id, phase)).read_bytes())

    def has_output(self, doc_id: str, phase: str) -> bool:
        return (self.root / output_path(doc_id, phase)).exists()

    def cached(self, namespace: str, key: str) -> Any:
        path = self.root / cache_key_path(namespace, key)
        try:
            return json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None

    def put_cached(self, namespace: str, key: str, value: Any) -> None:
        write_atomically(self.root / cache_key_path(namespace, key), as_json(value))

    def remove_document(self, doc_id: str) -> None:
        if DOC_ID.fullmatch(doc_id):  # ids may come from Redis: only a real one names a directory
            shutil.rmtree(self.root / doc_id, ignore_errors=True)
