"""Reuse keys, and stored results as the job path finds them: what changes a key, and what is a miss."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from rq import Queue

from levers import keys, metrics
from levers.documents.ledger import Ledger
from levers.documents.store import LocalStore, cache_key_path
from levers.documents.submission import Submitter
from levers.pipeline.loading import load_pipeline
from levers.pipeline.watching import PipelineWatcher
from levers.worker import reuse
from levers.worker.jobs import complete_phase, perform_phase, start_phase
from levers.worker.phase_context import Document
from levers.worker.runtime import WorkerRuntime
from tests.conftest import make_project

PIPELINE = "reusing"


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A phase package on sys.path: a handler module that imports a helper inside its function."""
    root = tmp_path / "mine"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "handler.py").write_text(
        "def handle(doc, ctx):\n    from mine import helper\n    return helper.value()\n"
    )
    (root / "helper.py").write_text("def value():\n    return 1\n")
    (root / "unrelated.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield root
    for name in [n for n in sys.modules if n == "mine" or n.startswith("mine.")]:
        del sys.modules[name]


def test_the_code_version_covers_the_modules_of_its_package_it_imports_lazily_too(package: Path) -> None:
    from mine.handler import handle  # type: ignore[import-not-found]

    assert set(reuse._package_files("mine.handler")) == {"mine", "mine.handler", "mine.helper"}
    before = reuse._sources_digest.__wrapped__("mine.handler")
    (package / "unrelated.py").write_text("X = 2\n")
    assert reuse._sources_digest.__wrapped__("mine.handler") == before
    (package / "helper.py").write_text("def value():\n    return 2\n")
    assert reuse._sources_digest.__wrapped__("mine.handler") != before
    handle.version = "7"
    assert reuse.code_version(handle) == "version:7"  # declared: the sources no longer count


def handler(doc: Document, ctx: Any) -> None:
    """A stand-in handler; this module's source is its code version."""


def key(options: Any = None, text: str = "text", name: str = "a.md", **provider: str) -> str | None:
    doc = Document(id="0" * 20, name=name, content=b"", input={"text": text})
    if provider:
        sys.modules[__name__].reuse_provider = lambda options: provider["value"]  # type: ignore[attr-defined]
    try:
        return reuse.reuse_key(handler, "tests.test_reuse:handler", options or {"n": 1}, doc)
    finally:
        if provider:
            del sys.modules[__name__].reuse_provider  # type: ignore[attr-defined]


def test_a_key_changes_with_the_input_the_options_the_name_and_the_provider() -> None:
    same = key()
    assert same == key() and same is not None
    assert len({same, key(text="other"), key({"n": 2}), key(name="b.md"), key(value="anthropic:x")}) == 5
    assert key(value="anthropic:x") != key(value="anthropic:y")


def test_a_provider_hook_that_raises_means_no_reuse() -> None:
    def broken(options: Any) -> str:
        raise RuntimeError("no key")

    sys.modules[__name__].reuse_provider = broken  # type: ignore[attr-defined]
    try:
        assert reuse.reuse_key(handler, "tests.test_reuse:handler", {}, Document("0" * 20, "a", b"")) is None
    finally:
        del sys.modules[__name__].reuse_provider  # type: ignore[attr-defined]


def kept(
    connection: redis.Redis,
    store: LocalStore,
    output: Any,
    key: str = "k" * 64,
    ttl_s: int = reuse.REUSE_TTL_S,
) -> str:
    result = reuse.keep_result(store, "chunking", output)
    assert result is not None
    with connection.pipeline() as pipe:
        reuse.index_result(pipe, PIPELINE, "chunking", key, result, ttl_s)
        pipe.execute()
    return result


TTL_S = reuse.REUSE_TTL_S


def test_a_kept_result_is_found_and_its_entry_renewed(connection: redis.Redis, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    output = {"chunks": [{"text": "é", "n": 1.5}], "none": None}
    kept(connection, store, output)
    connection.expire(keys.reuse(PIPELINE, "chunking", "k" * 64), 10)

    assert reuse.stored_result(connection, store, PIPELINE, "chunking", "k" * 64, TTL_S) == (True, output)
    assert connection.ttl(keys.reuse(PIPELINE, "chunking", "k" * 64)) > 10
    assert reuse.stored_result(connection, store, PIPELINE, "chunking", "m" * 64, TTL_S) == (False, None)
    kept(connection, store, None, key="n" * 64)  # a handler may return None: still a result
    assert reuse.stored_result(connection, store, PIPELINE, "chunking", "n" * 64, TTL_S) == (True, None)


@pytest.mark.parametrize(
    "damage", ["missing", "not JSON", "altered", "not an entry"], ids=lambda d: d.replace(" ", "-")
)
def test_a_result_missing_or_damaged_in_the_store_is_a_miss(
    connection: redis.Redis, tmp_path: Path, damage: str
) -> None:
    store = LocalStore(tmp_path)
    result = kept(connection, store, {"chunks": [1, 2, 3]})
    path = tmp_path / cache_key_path(reuse.NAMESPACE, result)
    if damage == "missing":
        path.unlink()
    else:
        written = {"not JSON": "{\"output\": [", "altered": json.dumps({"output": {"chunks": [1, 2]}}),
                   "not an entry": json.dumps([1, 2, 3])}  # fmt: skip
        path.write_text(written[damage])

    assert reuse.stored_result(connection, store, PIPELINE, "chunking", "k" * 64, TTL_S) == (False, None)


@pytest.mark.parametrize("value", ["../../../etc/passwd", "x" * 64, "", "A" * 64])
def test_an_index_entry_that_is_not_a_hash_is_a_miss(
    connection: redis.Redis, tmp_path: Path, value: str
) -> None:
    connection.set(keys.reuse(PIPELINE, "chunking", "k" * 64), value)
    found = reuse.stored_result(connection, LocalStore(tmp_path), PIPELINE, "chunking", "k" * 64, TTL_S)
    assert found == (False, None)


def test_a_reused_phase_counts_as_reused_and_adds_no_job_time(connection: redis.Redis) -> None:
    ledger = Ledger(connection, PIPELINE)
    for doc_id, reused in (("a" * 20, True), ("b" * 20, False)):
        ledger.add(doc_id, "d.md", "files", "chunking", force=False)
        ledger.start(doc_id, "chunking")
        with connection.pipeline() as pipe:
            ledger.finished(doc_id, "chunking", 0.5, 0, "kg_ingest", pipe, reused=reused)
            pipe.execute()

    assert ledger.totals("chunking") == {"done": 1, "reused": 1}
    assert metrics.read(connection, PIPELINE, "chunking").done == 1  # what `levers plan` measures
    record = ledger.get("a" * 20)
    assert record is not None and record.phases["chunking"].reused
    assert ledger.get("b" * 20).phases["chunking"].reused is False  # type: ignore[union-attr]


def test_a_document_submitted_without_reuse_says_so_in_its_record(connection: redis.Redis) -> None:
    ledger = Ledger(connection, PIPELINE)
    ledger.add("a" * 20, "d.md", "files", "extraction", force=False, reuse=False)
    ledger.add("b" * 20, "d.md", "files", "extraction", force=False)
    assert [r.reuse for r in ledger.get_many(["a" * 20, "b" * 20])] == [False, True]  # type: ignore[union-attr]


def through_first(runtime: WorkerRuntime, doc_id: str) -> tuple[bool, Any]:
    """Run the toy pipeline's first phase on the document as a worker does: (reused, output)."""
    performed = perform_phase(runtime, start_phase(runtime, "first", doc_id))
    complete_phase(runtime, performed)
    return performed.reused, performed.output


@pytest.mark.parametrize("reusing", [True, False], ids=["reuse", "no-reuse"])
def test_a_job_takes_the_stored_result_instead_of_calling_the_handler(
    tmp_path: Path, connection: redis.Redis, reusing: bool
) -> None:
    root = make_project(tmp_path, docs=1)
    submitter = Submitter(load_pipeline(root / "pipeline.yaml"), connection)
    [outcome] = submitter.submit_paths([str(root / "docs")])
    runtime = WorkerRuntime(PipelineWatcher.open(root / "pipeline.yaml"), connection, "redis://unused")
    assert outcome.doc_id is not None
    reused, first = through_first(runtime, outcome.doc_id)
    assert not reused

    submitter.submit_paths([str(root / "docs")], force=True, reuse=reusing)
    reused, again = through_first(runtime, outcome.doc_id)

    # the toy handler records its pid and times: the same output is the stored one, no handler ran
    assert (reused, again == first) == (reusing, reusing)
    totals = Ledger(connection, "toy").totals("first")
    assert (totals.get("done"), totals.get("reused", 0)) == (2 - reusing, int(reusing))
    assert Queue("toy.second", connection=connection).count == 2  # handed on as if the phase ran


def test_an_entry_lives_no_longer_than_the_retention_of_records(
    connection: redis.Redis, tmp_path: Path
) -> None:
    assert reuse.entry_ttl_s(None) == reuse.REUSE_TTL_S
    assert reuse.entry_ttl_s(365) == reuse.REUSE_TTL_S
    assert reuse.entry_ttl_s(2) == 2 * 86400
    assert reuse.entry_ttl_s(1e-9) == 1
    store = LocalStore(tmp_path)
    kept(connection, store, {"chunks": []}, ttl_s=reuse.entry_ttl_s(2))
    assert 0 < connection.ttl(keys.reuse(PIPELINE, "chunking", "k" * 64)) <= 2 * 86400

    assert reuse.stored_result(connection, store, PIPELINE, "chunking", "k" * 64, reuse.entry_ttl_s(2))[0]
    assert 0 < connection.ttl(keys.reuse(PIPELINE, "chunking", "k" * 64)) <= 2 * 86400  # renewed as long
