"""Reusing a phase's result: a job whose input, code and settings were seen before takes the result
stored then, and calls no handler (no API call, no graph write).

A job's reuse key is a hash of:

- what the handler reads: the document's id (its content's hash) and name, and the phase's input
  (the previous phase's output, by its hash; an entry phase reads the document itself);
- the handler: its dotted path and code version, the ``version`` the handler declares, else a hash
  of its module's source and of the sources of the modules of the same package it imports
  (wherever in its code, so a phase's helpers count too);
- the phase's ``options`` as validated, defaults included;
- the provider and model the phase calls: what ``reuse_provider(options)`` in the handler's
  module returns, for what the environment decides (which provider ``auto`` picks).

The index, key -> the hash of the result, is in Redis (keys.reuse): shared by every worker on
every host, one string per key that expires REUSE_TTL_S after it was last written or used (or
after the pipeline's ``retention``, when shorter: no entry outlives the records it came with), so
it stays bounded. The result is in the artifact store under its own hash (``cache/reuse/``),
written create-only: two workers finishing the same key write it once. A result that is missing
or does not hash to what the index says is a miss, and the job does the work.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from levers import keys
from levers.documents.store import ArtifactStore, as_json
from levers.errors import StoreError
from levers.worker.phase_context import Document

log = logging.getLogger("levers.worker")

# An entry is dropped this long after it was last written or used: reuse pays for a re-run within
# weeks (a changed setting, a resubmitted batch), and Redis holds about 210 bytes per entry.
REUSE_TTL_S = 30 * 86400
DAY_S = 86400
NAMESPACE = "reuse"
# Part of every key: a change to what goes into a key (or how results are stored) changes it.
KEY_FORMAT = 2
# The most modules of a handler's package whose sources its code version covers.
MAX_MODULES = 200
_DIGEST = re.compile(r"[0-9a-f]{64}")
# What reuse_provider in a handler's module is called: the phase's options -> a string.
PROVIDER_HOOK = "reuse_provider"


def digest(value: Any) -> str:
    """The hash of a JSON value as the artifact store holds it."""
    return hashlib.sha256(as_json(value)).hexdigest()


def reuse_key(handler: Callable[..., Any], dotted: str, options: Any, doc: Document) -> str | None:
    """The job's reuse key; None when the handler's module cannot say which provider it calls
    (its ``reuse_provider`` raised): then the job is not reused, and its result not kept."""
    module = sys.modules.get(getattr(handler, "__module__", "") or "")
    hook = getattr(module, PROVIDER_HOOK, None)
    try:
        provider = str(hook(options)) if callable(hook) else None
    except Exception as exc:  # the handler will fail on the same settings, with its own message
        log.debug("%s.%s failed: %s", getattr(module, "__name__", "?"), PROVIDER_HOOK, exc)
        return None
    settings = options.model_dump(mode="json") if hasattr(options, "model_dump") else options
    # the version too: a name's content that comes back (v3 = v1) must replace v2's graph facts
    version = [doc.version.name, doc.version.number, doc.version.keep] if doc.version else None
    material = [
        KEY_FORMAT, doc.id, doc.name, version, None if doc.input is None else digest(doc.input), dotted,
        code_version(handler), settings, provider,
    ]  # fmt: skip
    text = json.dumps(material, sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def code_version(handler: Callable[..., Any]) -> str:
    """The ``version`` a handler declares, else the hash of its module's sources."""
    declared = getattr(handler, "version", None)
    if declared is not None:
        return f"version:{declared}"
    return f"source:{_sources_digest(getattr(handler, '__module__', '') or '')}"


@functools.cache
def _sources_digest(module_name: str) -> str:
    """The hash of the module's file and of those of its package's modules it imports (once per
    process: a worker runs the code it imported, not the file as edited since)."""
    hashed = hashlib.sha256()
    for name, path in sorted(_package_files(module_name).items()):
        hashed.update(name.encode() + b"\0")
        try:
            hashed.update(path.read_bytes())
        except OSError:
            hashed.update(b"unreadable")
    return hashed.hexdigest()


def _package_files(module_name: str) -> dict[str, Path]:
    """The module's file and, transitively, those of the modules of its top-level package that its
    code imports (read from the source, so imports inside functions count, and nothing is
    imported to find them)."""
    top = module_name.partition(".")[0]
    files: dict[str, Path] = {}
    todo = [module_name]
    while todo and len(files) < MAX_MODULES:
        name = todo.pop()
        if name in files:
            continue
        path = _file_of(name)
        if path is None:
            continue
        files[name] = path
        if path.suffix == ".py":
            todo += [found for found in _imported(path, name) if found.partition(".")[0] == top]
    return files


def _file_of(name: str) -> Path | None:
    """The file of module ``name`` (imported or not) under its imported top-level package."""
    loaded = getattr(sys.modules.get(name), "__file__", None)
    if loaded:
        return Path(loaded)
    top, _, rest = name.partition(".")
    package = sys.modules.get(top)
    if not rest or package is None:
        return None
    for root in getattr(package, "__path__", []):
        base = Path(root).joinpath(*rest.split("."))
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _imported(path: Path, module_name: str) -> list[str]:
    """The module names a source file imports, ``from a import b`` giving both a and a.b."""
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return []
    package = module_name if path.name == "__init__.py" else module_name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


def entry_ttl_s(retention_days: float | None) -> int:
    """How long an index entry lives after it was last written or used."""
    if retention_days is None:
        return REUSE_TTL_S
    return max(1, min(REUSE_TTL_S, round(retention_days * DAY_S)))


def stored_result(
    connection: redis.Redis, store: ArtifactStore, pipeline: str, phase: str, key: str, ttl_s: int
) -> tuple[bool, Any]:
    """(True, the result) when the index has ``key`` and the store holds its result intact (the
    entry's life is renewed); else (False, None): anything missing, unreadable or altered is a
    miss, never an error, since the job can always do the work."""
    try:
        found = connection.getex(keys.reuse(pipeline, phase, key), ex=ttl_s)
    except redis.RedisError:
        return False, None
    text = found.decode(errors="replace") if isinstance(found, bytes) else None
    if text is None or not _DIGEST.fullmatch(text):
        return False, None
    try:
        entry = store.cached(NAMESPACE, text)
    except (StoreError, OSError, ValueError) as exc:
        log.warning("%s: the stored result to reuse cannot be read (%s); running the phase", phase, exc)
        return False, None
    if not isinstance(entry, dict) or "output" not in entry or digest(entry["output"]) != text:
        log.warning("%s: the stored result %s is missing or altered; running the phase", phase, text[:12])
        return False, None
    return True, entry["output"]


def keep_result(store: ArtifactStore, phase: str, output: Any) -> str | None:
    """Store ``output`` for reuse under its hash, which the caller then indexes; None when the
    store refused it (the result is then not reused, and the document goes on all the same)."""
    result = digest(output)
    try:
        store.put_cached(NAMESPACE, result, {"output": output})
    except (StoreError, OSError) as exc:
        log.warning("%s: the result could not be kept for reuse: %s", phase, exc)
        return None
    return result


def index_result(
    pipe: redis.client.Pipeline, pipeline: str, phase: str, key: str, result: str, ttl_s: int
) -> None:
    """Queue on ``pipe`` the index entry: ``key`` -> the hash of the result the store holds."""
    pipe.set(keys.reuse(pipeline, phase, key), result, ex=ttl_s)
