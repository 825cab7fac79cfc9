"""An artifact store in an object store: S3 and S3-compatible servers (MinIO), GCS or Azure.

obstore talks to all three with one API, reads the standard variables (``AWS_*`` with
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``GOOGLE_*``, ``AZURE_*``) and does
conditional puts, so a document or a cached value, whose key is a hash of its content, is written
with "create only": a job run twice, or two workers finishing the same key, write it once. A
document a phase reads is streamed to a local file under ``.levers/downloads/`` and removed when
the phase is done with it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import obstore
from obstore.exceptions import (
    AlreadyExistsError,
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import from_url

from levers.documents.store import DOC_ID, as_json, cache_key_path, output_path, source_path
from levers.errors import StoreError

# A worker's call retries a short outage away; a command says within seconds that it cannot.
PATIENT_RETRY = timedelta(seconds=60)
IMPATIENT_RETRY = timedelta(seconds=5)
# Values that are secrets wherever they appear in an error the client library wrote.
SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCOUNT_KEY",
                    "AZURE_STORAGE_SAS_KEY", "GOOGLE_SERVICE_ACCOUNT_KEY")  # fmt: skip


class ObjectStore:
    """The store at ``url``; local copies of documents go to ``downloads``."""

    def __init__(self, url: str, downloads: Path, patient: bool = True) -> None:
        self.url = url
        self.downloads = downloads
        endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
        retry = PATIENT_RETRY if patient else IMPATIENT_RETRY
        self._store = from_url(
            url,
            client_options={"allow_http": endpoint.startswith("http://"), "connect_timeout": "5s"},
            retry_config={"max_retries": 10, "retry_timeout": retry},
        )

    def put_document(self, doc_id: str, name: str, data: bytes) -> None:
        self._create(source_path(doc_id, name), data)

    def has_document(self, doc_id: str, name: str) -> bool:
        return self._exists(source_path(doc_id, name))

    def document_file(self, doc_id: str, name: str) -> Path:
        local = self.downloads / doc_id / Path(name).name
        if local.exists():  # a document's bytes never change under its id
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{os.getpid()}.part")
        with self._translated("read", source_path(doc_id, name)), partial.open("wb") as out:
            for chunk in obstore.get(self._store, source_path(doc_id, name)).stream():
                out.write(chunk)
        partial.replace(local)
        return local

    def release(self, path: Path) -> None:
        if path.is_relative_to(self.downloads):
            shutil.rmtree(path.parent, ignore_errors=True)

    def put_output(self, doc_id: str, phase: str, output: Any) -> None:
        with self._translated("write", output_path(doc_id, phase)):
            obstore.put(self._store, output_path(doc_id, phase), as_json(output))

    def output(self, doc_id: str, phase: str) -> Any:
        with self._translated("read", output_path(doc_id, phase)):
            return json.loads(obstore.get(self._store, output_path(doc_id, phase)).bytes().to_bytes())

    def has_output(self, doc_id: str, phase: str) -> bool:
        return self._exists(output_path(doc_id, phase))

    def cached(self, namespace: str, key: str) -> Any:
        path = cache_key_path(namespace, key)
        try:
            with self._translated("read", path):
                return json.loads(obstore.get(self._store, path).bytes().to_bytes())
        except (FileNotFoundError, ValueError):
            return None  # a miss, as is an unreadable entry: a cache only saves work

    def put_cached(self, namespace: str, key: str, value: Any) -> None:
        self._create(cache_key_path(namespace, key), as_json(value))

    def remove_document(self, doc_id: str) -> None:
        if not DOC_ID.fullmatch(doc_id):  # ids may come from Redis: only a real one names a prefix
            return
        with self._translated("remove", f"{doc_id}/"):
            listed = obstore.list(self._store, prefix=f"{doc_id}/")
            paths = [meta["path"] for batch in listed for meta in batch]
            if paths:
                obstore.delete(self._store, paths)

    def _create(self, path: str, data: bytes) -> None:
        try:
            with self._translated("write", path):
                obstore.put(self._store, path, data, mode="create")
        except AlreadyExistsError:
            pass  # written before, and the same bytes: its key is their hash

    def _exists(self, path: str) -> bool:
        try:
            with self._translated("read", path):
                obstore.head(self._store, path)
        except FileNotFoundError:
            return False
        return True

    @contextmanager
    def _translated(self, verb: str, path: str) -> Iterator[None]:
        """The client library's errors as one StoreError line; a missing key stays
        FileNotFoundError (its caller decides what that means) and "already exists" stays too."""
        try:
            yield
        except AlreadyExistsError:
            raise
        except (BaseError, OSError) as exc:
            if _missing_key(exc):
                raise FileNotFoundError(f"{self.url}: no {path}") from None
            if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
                raise  # the local copy's own file
            raise store_error(self.url, verb, path, exc) from None


def _missing_key(exc: BaseException) -> bool:
    """Not found, and not because the bucket itself is missing (that is a configuration error)."""
    return isinstance(exc, (FileNotFoundError, NotFoundError)) and "NoSuchBucket" not in str(exc)


def store_error(url: str, verb: str, path: str, exc: BaseException) -> StoreError:
    """One line naming the store, what failed and the fix; no secret in it."""
    text = str(exc)
    if "NoSuchBucket" in text or "ContainerNotFound" in text:
        reason, fix = "no such bucket or container", "create it, or fix store: in pipeline.yaml"
    elif isinstance(exc, (PermissionDeniedError, UnauthenticatedError)) or " 403 " in text:
        reason, fix = (
            "the credentials were refused",
            "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or GCS, Azure's)",
        )
    elif "error sending request" in text or "connect" in text.lower():
        endpoint = os.environ.get("AWS_ENDPOINT_URL")
        reason = f"cannot reach {endpoint}" if endpoint else "cannot reach the service"
        fix = "check the network and AWS_ENDPOINT_URL"
    else:
        reason, fix = (
            _first_line(text),
            "check store: in pipeline.yaml and the AWS_*, GOOGLE_*, AZURE_* variables",
        )
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name)
        if secret:
            reason = reason.replace(secret, "***")
    return StoreError(f"artifact store {url}: cannot {verb} {path}: {reason}", fix=fix)


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else "unknown error"
