"""Versions of a document name: numbered as they come, recorded for phases, listed by `levers show`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import redis
from rq import Queue

from levers.documents.ledger import Ledger
from levers.documents.submission import Submitter
from levers.documents.versions import DocumentVersion, Versions, content_hash
from levers.pipeline.loading import load_pipeline
from tests.conftest import levers, make_project


def submitter(root: Path, connection: redis.Redis) -> Submitter:
    return Submitter(load_pipeline(root / "pipeline.yaml"), connection)


def test_other_content_under_a_name_is_its_next_version(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=1)
    doc = root / "docs" / "doc0.txt"
    submit = submitter(root, connection)
    [first] = submit.submit_paths([str(doc)])
    [same] = submit.submit_paths([str(doc)])
    doc.write_text("document number 0 has seven words now")
    [second] = submit.submit_paths([str(doc)], keep_versions=True)
    doc.write_text("document number 0 has six words")  # back to the first text
    [reverted] = submit.submit_paths([str(doc)])

    assert (first.version, first.skipped) == (1, False)
    assert (same.version, same.skipped) == (1, True), "the same content again is no new version"
    assert (second.version, second.skipped) == (2, False) and second.doc_id != first.doc_id
    assert reverted.doc_id == first.doc_id and (reverted.version, reverted.skipped) == (3, False), (
        "content that was an older version comes back as the newest, and runs again"
    )
    assert Queue("toy.first", connection=connection).count == 3
    ledger = Ledger(connection, "toy")
    name = str(doc)
    assert ledger.get(second.doc_id or "") is not None
    assert ledger.get(second.doc_id or "").version == DocumentVersion(name, 2, keep=True)  # type: ignore[union-attr]
    assert ledger.get(first.doc_id or "").version == DocumentVersion(name, 3)  # type: ignore[union-attr]
    entries = Versions(connection, "toy").entries(name)
    assert [(e.number, e.id, e.keep) for e in entries] == [
        (1, first.doc_id, False), (2, second.doc_id, True), (3, first.doc_id, False)
    ]  # fmt: skip
    assert entries[1].hash == content_hash(b"document number 0 has seven words now")


def test_a_name_is_the_path_so_equal_file_names_in_two_directories_are_two_documents(
    tmp_path: Path, connection: redis.Redis
) -> None:
    root = make_project(tmp_path, docs=0)
    for folder, text in (("a", "first text here"), ("b", "second text here")):
        (root / folder).mkdir()
        (root / folder / "notes.txt").write_text(text)
    outcomes = submitter(root, connection).submit_paths([str(root / "a"), str(root / "b")])
    assert [o.version for o in outcomes] == [1, 1]
    versions = Versions(connection, "toy")
    first, second = str(root / "a" / "notes.txt"), str(root / "b" / "notes.txt")
    assert versions.with_file_name("notes.txt") == [first, second]
    assert versions.named(first) == first
    assert versions.named("notes.txt") is None
    shown = levers("show", "notes.txt", cwd=root)
    assert shown.returncode == 2 and "'notes.txt' is the file name of 2 documents" in shown.stderr
    assert levers("show", "a/notes.txt", cwd=root).returncode == 0


def test_show_lists_a_names_versions(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=1)
    doc = root / "docs" / "doc0.txt"
    assert levers("submit", "docs/doc0.txt", cwd=root).returncode == 0
    doc.write_text("a changed text of six words")
    again = levers("submit", "docs/doc0.txt", cwd=root)
    assert again.returncode == 0 and "docs/doc0.txt: version 2 of this document" in again.stderr

    shown = levers("show", "docs/doc0.txt", cwd=root)
    assert shown.returncode == 0, shown.stderr
    assert str(doc) in shown.stdout and content_hash(doc.read_bytes()) in shown.stdout
    assert "by version 2" in shown.stdout and shown.stdout.count("queued") == 2
    listed = json.loads(levers("show", "doc0.txt", "--json", cwd=root).stdout)
    assert listed["name"] == str(doc)
    assert [(v["version"], v["status"], v["replaced_by"]) for v in listed["versions"]] == [
        (1, "queued", 2), (2, "queued", None)
    ]  # fmt: skip
    assert listed["versions"][1]["id"] == again.stdout.strip()
    timeline = levers("show", again.stdout.strip(), cwd=root)
    assert timeline.returncode == 0 and f"version 2 of {doc}" in timeline.stdout

    unknown = levers("show", "nothing.txt", cwd=root)
    assert unknown.returncode == 2 and "no document with id or name 'nothing.txt'" in unknown.stderr


def test_show_finds_a_name_typed_as_levers_shows_it(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)
    (root / "docs" / "new\nline.txt").write_text("a name with a line break")
    [doc_id] = levers("submit", "docs", cwd=root).stdout.split()

    typed = levers("show", "new\\nline.txt", "--json", cwd=root)  # as status and show print it

    assert typed.returncode == 0, typed.stderr
    assert json.loads(typed.stdout)["versions"][0]["id"] == doc_id


def test_stdin_documents_are_versions_of_their_given_name(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=0)
    submit = submitter(root, connection)
    one = submit.submit_bytes(b"upload one", "upload.txt")
    two = submit.submit_bytes(b"upload two", "upload.txt", keep_versions=True)
    assert (one.version, two.version) == (1, 2)
    record = Ledger(connection, "toy").get(two.doc_id or "")
    assert record is not None and record.version == DocumentVersion("upload.txt", 2, keep=True)


def test_what_redis_holds_is_not_trusted(tmp_path: Path, connection: redis.Redis) -> None:
    root = make_project(tmp_path, docs=1)
    [outcome] = submitter(root, connection).submit_paths([str(root / "docs" / "doc0.txt")])
    key = f"levers:toy:doc:{outcome.doc_id}"
    connection.hset(key, "version", "not a number")
    assert Ledger(connection, "toy").get(outcome.doc_id or "").version is None  # type: ignore[union-attr]
    versions_key = next(iter(connection.scan_iter("levers:toy:versions:*")))
    connection.hset(versions_key, mapping={"2": "{not json", "3": json.dumps({"id": 1})})
    assert [e.number for e in Versions(connection, "toy").entries(str(root / "docs" / "doc0.txt"))] == [1]


@pytest.mark.parametrize("kept", ["not a number:x", "7", "", ":", "-3:abc", "1e400:abc", "9" * 40 + ":abc"])
def test_a_hostile_latest_number_of_an_expired_name_never_breaks_numbering(
    connection: redis.Redis, kept: str
) -> None:
    versions = Versions(connection, "hostile")
    name = f"/docs/{kept!r}.txt"
    digest = hashlib.sha256(name.encode()).hexdigest()[:32]
    connection.hset("levers:hostile:version-latest", digest, kept)

    first, new = versions.add(name, "a" * 20, "0" * 64, keep=False)

    assert new and first.number >= 1
    assert versions.add(name, "b" * 20, "1" * 64, keep=False)[0].number == first.number + 1
    assert connection.hlen("levers:hostile:version-latest") == 0  # the name has its versions again
