"""Failed documents an operator can act on: permanent errors fail at once, `levers failed` lists
what is kept, `levers retry` requeues where each failed, failed_ttl and `levers purge` forget them,
and a content keeps every name it came under. Real `levers` processes on the embedded server."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import fakeredis
import pytest
import redis
from rq import Queue
from rq.registry import ScheduledJobRegistry

from levers.documents.ledger import MAX_NAMES, Ledger
from levers.documents.sniffing import routed_name, sniffed_suffix
from levers.documents.submission import document_id
from tests.conftest import StartLevers, levers, stop, wait_until

PHASES = """
from pathlib import Path

from levers import Permanent


class Unreadable(Permanent):
    pass


def first(doc, ctx):
    data = doc.read_bytes()
    if b"BROKEN" in data:
        raise Unreadable("no text layer")
    if b"FLAKY" in data:
        raise ConnectionError("connection reset by peer")
    if doc.suffix == ".pdf" and not data.startswith(b"%PDF"):
        raise Unreadable("not a PDF")
    return {"text": data.decode(errors="replace"), "name": doc.name}


def second(doc, ctx):
    if "LATE" in doc.input["text"] and not Path(ctx.options["fixed"]).exists():
        raise RuntimeError("the service is down")
    return {"words": len(doc.input["text"].split())}
"""

PIPELINE = """
name: fl
phases:
  first:
    handler: flphases:first
    accepts: [.txt, .pdf, .html]
    next: second
    retries: 3
    retry_delay: 600
    levers: {{workers: 1}}
  second:
    handler: flphases:second
    retries: 0
    levers: {{workers: 1}}
    options: {{fixed: {fixed}}}
"""

HTML = b"<!DOCTYPE html><html><body><p>same words here</p></body></html>"


@pytest.fixture
def project(tmp_path: Path, redis_url: str) -> Path:
    (tmp_path / "flphases.py").write_text(PHASES)
    (tmp_path / "pipeline.yaml").write_text(PIPELINE.format(fixed=tmp_path / "fixed"))
    (tmp_path / "docs").mkdir()
    return tmp_path


@pytest.fixture
def up(project: Path, start_levers: StartLevers) -> subprocess.Popen[str]:
    return start_levers("up", cwd=project)


def write(project: Path, name: str, data: bytes) -> str:
    path = project / "docs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return document_id(data)


def doc(connection: redis.Redis, doc_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in connection.hgetall(f"levers:fl:doc:{doc_id}").items()}


def failed_json(project: Path, *args: str) -> list[dict[str, object]]:
    result = levers("failed", "--json", *args, cwd=project)
    assert result.returncode == 0, result.stderr
    listed: list[dict[str, object]] = json.loads(result.stdout)
    return listed


def phase_failed(project: Path, phase: str) -> int:
    result = levers("status", "--json", cwd=project)
    assert result.returncode == 0, result.stderr
    return int(next(p["failed"] for p in json.loads(result.stdout)["phases"] if p["phase"] == phase))


def test_a_permanent_error_fails_at_once_while_a_transient_one_waits_for_its_retry(
    project: Path, connection: redis.Redis, up: subprocess.Popen[str]
) -> None:
    broken = write(project, "scan.txt", b"BROKEN scan")
    flaky = write(project, "flaky.txt", b"FLAKY upload")
    assert levers("submit", "docs", cwd=project).returncode == 0

    # retries: 3 with retry_delay: 600 s: only a failure that skips its retries ends in time
    wait_until(lambda: doc(connection, broken).get("status") == "failed")
    wait_until(
        lambda: (
            doc(connection, flaky).get("first:attempts") == "1"
            and doc(connection, flaky)["status"] == "queued"
        )
    )

    assert doc(connection, broken)["first:attempts"] == "1"
    scheduled = ScheduledJobRegistry(queue=Queue("fl.first", connection=connection))
    assert scheduled.count == 1  # the transient one, waiting for its retry
    listed = failed_json(project)
    assert [(f["id"], f["names"], f["phase"], f["attempts"], f["error"]) for f in listed] == [
        (broken, ["scan.txt"], "first", 1, "Unreadable: no text layer")
    ]
    assert phase_failed(project, "first") == 1
    table = levers("failed", cwd=project)
    assert table.returncode == 0 and broken[:12] in table.stdout and "scan.txt" in table.stdout


def test_retry_requeues_at_the_phase_where_it_failed_keeping_earlier_outputs(
    project: Path, connection: redis.Redis, up: subprocess.Popen[str]
) -> None:
    late = write(project, "late.txt", b"LATE but fine")
    assert levers("submit", "docs", cwd=project).returncode == 0
    wait_until(lambda: doc(connection, late).get("status") == "failed")
    first_output = project / ".levers" / "artifacts" / late / "first.json"
    made = first_output.stat().st_mtime_ns

    assert [f["id"] for f in failed_json(project, "--phase", "second")] == [late]
    assert failed_json(project, "--phase", "first") == []
    (project / "fixed").touch()  # what made it fail is fixed
    result = levers("retry", late[:10], cwd=project)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"requeued {late} (late.txt) at second"
    wait_until(lambda: doc(connection, late).get("status") == "done")
    record = doc(connection, late)
    assert (record["first:attempts"], record["second:attempts"]) == ("1", "2")  # first did not run again
    assert first_output.stat().st_mtime_ns == made
    assert "error" not in record
    assert failed_json(project) == [] and phase_failed(project, "second") == 0


def test_retry_refuses_what_it_cannot_requeue_in_one_line_each(project: Path, redis_url: str) -> None:
    done = write(project, "fine.txt", b"fine words")
    run = levers("run", "docs", cwd=project)
    assert run.returncode == 0, run.stderr

    unknown = levers("retry", "0000000000", cwd=project)
    not_failed = levers("retry", done, cwd=project)
    neither = levers("retry", cwd=project)
    both = levers("retry", done, "--all", cwd=project)

    assert unknown.returncode == 2 and unknown.stderr.strip() == "error: 0000000000: no document with this id"
    assert not_failed.returncode == 2
    assert not_failed.stderr.strip() == f"error: {done}: is done, not failed: nothing to retry"
    for result in (neither, both):
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
        assert "retry takes ids or --all" in result.stderr


def test_failed_records_expire_after_failed_ttl_and_readers_agree(
    project: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    old = write(project, "old.txt", b"BROKEN long ago")
    new = write(project, "new.txt", b"BROKEN just now")
    run = levers("run", "docs", cwd=project)
    assert run.returncode == 1
    # two hours pass for one of them, with failed_ttl an hour
    (project / "pipeline.yaml").write_text((project / "pipeline.yaml").read_text() + "failed_ttl: 3600\n")
    connection.zadd("levers:fl:phase:first:failed", {old: time.time() - 7200})

    assert [f["id"] for f in failed_json(project)] == [new]  # what is past it is not listed
    assert phase_failed(project, "first") == 1
    process = start_levers("up", cwd=project)
    wait_until(lambda: not connection.exists(f"levers:fl:doc:{old}"))
    stop(process)

    assert connection.zscore("levers:fl:docs", old) is None
    assert connection.zrange("levers:fl:phase:first:failed", 0, -1) == [new.encode()]
    assert not (project / ".levers" / "artifacts" / old).exists()
    assert doc(connection, new)["status"] == "failed"
    assert [f["id"] for f in failed_json(project)] == [new] and phase_failed(project, "first") == 1


def test_purge_asks_for_yes_when_not_a_terminal_and_keeps_recent_ones(
    project: Path, connection: redis.Redis
) -> None:
    old = write(project, "old.txt", b"BROKEN long ago")
    new = write(project, "new.txt", b"BROKEN just now")
    assert levers("run", "docs", cwd=project).returncode == 1
    connection.zadd("levers:fl:phase:first:failed", {old: time.time() - 3 * 86400})

    refused = levers("purge", "--failed", cwd=project)
    no_mode = levers("purge", "--yes", cwd=project)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "add --yes" in refused.stderr
    assert no_mode.returncode == 2 and "levers purge --failed" in no_mode.stderr
    assert len(failed_json(project)) == 2  # nothing went

    older = levers("purge", "--failed", "--older-than", "2d", "--yes", cwd=project)
    assert older.returncode == 0 and "purged 1 failed document(s)" in older.stderr
    assert [f["id"] for f in failed_json(project)] == [new]
    assert (
        not connection.exists(f"levers:fl:doc:{old}")
        and not (project / ".levers" / "artifacts" / old).exists()
    )
    every = levers("purge", "--failed", "--yes", cwd=project)
    assert every.returncode == 0 and failed_json(project) == [] and phase_failed(project, "first") == 0


def test_one_content_keeps_every_name_and_a_lying_extension_is_routed_by_content(
    project: Path, connection: redis.Redis
) -> None:
    same = write(project, "good/x.html", HTML)
    write(project, "bad/x.pdf", HTML)  # the same bytes, named as a PDF
    lying = write(project, "report.pdf", HTML.replace(b"same", b"other"))

    result = levers("run", "docs", cwd=project)

    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if same[:12] in line)
    assert "docs/bad/x.pdf, docs/good/x.html" in row and "done" in row
    assert "report.pdf" in result.stdout and "x.pdf failed" not in result.stderr
    assert json.loads(doc(connection, same)["names"]) == ["x.pdf", "x.html"]
    output = json.loads((project / ".levers" / "artifacts" / lying / "first.json").read_text())
    assert output["name"] == "report.html"  # the phase read it as what it is
    shown = levers("show", same, cwd=project)
    assert shown.returncode == 0 and "x.pdf, x.html" in shown.stdout


@pytest.mark.parametrize(
    ("name", "data", "routed"),
    [
        ("x.pdf", HTML, "x.html"),  # HTML saved as .pdf
        ("x.txt", b"%PDF-1.7\n1 0 obj", "x.pdf"),  # a PDF named .txt
        ("x.pdf", b"%PDF-1.7\n1 0 obj", "x.pdf"),
        ("notes.txt", HTML, "notes.txt"),  # HTML in a text file is text all the same
        ("x.pdf", b"plain words", "x.pdf"),  # no signature: the phase says what it is
        ("call.mp3", b"RIFF\x24\x00\x00\x00WAVEfmt ", "call.mp3"),  # audio of another container
        ("x.pdf", b"RIFF\x24\x00\x00\x00WAVEfmt ", "x.wav"),
        ("x.txt", "\ufeffplain UTF-16 text".encode("utf-16-le"), "x.txt"),  # FF FE is not an MP3 frame
        ("x.pdf", b"OggS\x00\x02", "x.pdf"),  # .ogg not accepted: kept, for the phase to refuse
    ],
)
def test_a_name_is_routed_by_its_content_only_where_its_extension_lies(
    name: str, data: bytes, routed: str
) -> None:
    accepted = {".pdf", ".html", ".txt", ".mp3", ".wav"}
    assert routed_name(name, data, lambda suffix: suffix in accepted) == routed


def test_sniffing_knows_the_signatures() -> None:
    assert sniffed_suffix(b"ID3\x04\x00") == ".mp3"
    assert sniffed_suffix(b"\xff\xfb\x90\x00") == ".mp3"
    assert sniffed_suffix(b"\x00\x00\x00\x20ftypM4A ") == ".m4a"
    assert sniffed_suffix(b"fLaC\x00") == ".flac"
    assert sniffed_suffix(b"  \n<html lang=en>") == ".html"
    assert sniffed_suffix(b"PK\x03\x04not a zip") is None
    assert sniffed_suffix(b"just words") is None


def test_a_record_keeps_at_most_max_names_and_trusts_no_names_it_did_not_write() -> None:
    connection = fakeredis.FakeRedis()
    ledger = Ledger(connection, "fl")
    for number in range(MAX_NAMES + 8):
        ledger.add("ab" * 10, f"copy{number}.txt", "files", "first", force=False)
    record = ledger.get("ab" * 10)
    assert record is not None and len(record.names) == MAX_NAMES and record.names[0] == "copy0.txt"

    connection.hset("levers:fl:doc:" + "ab" * 10, "names", '{"not": "a list"}')
    assert ledger.get("ab" * 10).names == ["copy0.txt"]  # type: ignore[union-attr]
    connection.hset("levers:fl:doc:" + "ab" * 10, "names", json.dumps([7, "kept.txt", None]))
    assert ledger.get("ab" * 10).names == ["kept.txt"]  # type: ignore[union-attr]
