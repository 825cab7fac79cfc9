"""Redis stays bounded as documents finish: a done document keeps its record and nothing of its
jobs, and past `retention:` only its id, through which deduplication keeps working. Real `levers`
processes on the embedded server, and the ledger on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import redis

from levers.documents.ledger import MAX_NAMES_BYTES, DocStatus, Ledger
from levers.documents.retention import DAY_S, Retention
from levers.pipeline.loading import load_pipeline
from tests.conftest import TOY_PHASES, StartLevers, levers, stop, submit, wait_until

PIPELINE = """
name: kept
{retention}
phases:
  first:
    handler: toyphases:first
    accepts: [.txt]
    next: second
    levers: {{workers: 1}}
  second:
    handler: toyphases:second
    levers: {{workers: 1}}
"""

# A done document's record in Redis, at most.
RECORD_BYTES = 2048


def project(root: Path, docs: int, retention: str = "") -> Path:
    (root / "toyphases.py").write_text(TOY_PHASES)
    (root / "pipeline.yaml").write_text(PIPELINE.format(retention=retention))
    (root / "docs").mkdir()
    for i in range(docs):
        (root / "docs" / f"doc{i}.txt").write_text(f"document number {i} has six words")
    return root


def record(connection: redis.Redis, doc_id: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in connection.hgetall(f"levers:kept:doc:{doc_id}").items()}


def done_counts(root: Path, field: str = "done") -> dict[str, int]:
    result = levers("status", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    return {p["phase"]: p[field] for p in json.loads(result.stdout)["phases"]}


def test_a_done_document_keeps_its_record_and_nothing_of_its_jobs(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = project(tmp_path, docs=4)
    start_levers("up", cwd=root)
    doc_ids = submit(root, "docs")
    wait_until(lambda: all(record(connection, d).get("status") == "done" for d in doc_ids))

    # RQ's job hashes and results go as each job hands its document on
    wait_until(lambda: not [*connection.scan_iter("rq:job:*"), *connection.scan_iter("rq:results:*")])
    for doc_id in doc_ids:
        assert int(connection.memory_usage(f"levers:kept:doc:{doc_id}") or 0) <= RECORD_BYTES
    shown = levers("show", doc_ids[0][:8], cwd=root)
    assert shown.returncode == 0, shown.stderr
    assert "first" in shown.stdout and "second" in shown.stdout


def test_past_retention_only_the_id_stays_and_the_same_content_is_still_skipped(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    root = project(tmp_path, docs=3, retention="retention: 0.00002   # days: under 2 s")
    up = start_levers("up", cwd=root)
    doc_ids = submit(root, "docs")
    wait_until(lambda: all(record(connection, d).get("status") == "done" for d in doc_ids))
    finished = max(float(record(connection, d)["finished"]) for d in doc_ids)
    counts = done_counts(root)
    assert counts == {"first": 3, "second": 3}
    stop(up)
    wait_until(lambda: time.time() > finished + 0.00002 * DAY_S)

    start_levers("up", cwd=root)  # its first pass expires what is past retention
    wait_until(lambda: connection.scard("levers:kept:expired") == 3)
    assert not any(connection.exists(f"levers:kept:doc:{d}") for d in doc_ids)
    assert done_counts(root) == counts
    # of each name's versions only its latest number stays; reuse entries lived no longer
    assert list(connection.scan_iter("levers:kept:versions:*")) == []
    assert connection.scard("levers:kept:version-names") == 0
    assert sorted(v.split(b":")[0] for v in connection.hvals("levers:kept:version-latest")) == [b"1"] * 3
    assert list(connection.scan_iter("levers:kept:reuse:*")) == []

    shown = levers("show", doc_ids[0][:8], cwd=root)
    assert shown.returncode == 0, shown.stderr
    assert "expired" in shown.stdout and "second" in shown.stdout  # the history the store keeps

    again = levers("submit", "docs", cwd=root)
    assert again.returncode == 0, again.stderr
    assert again.stderr.count("already submitted") == 3
    assert connection.llen("rq:queue:kept.first") == 0 and connection.scard("levers:kept:expired") == 3

    forced = levers("submit", "--force", "docs/doc0.txt", cwd=root)
    assert forced.returncode == 0, forced.stderr
    rerun = forced.stdout.strip()
    wait_until(lambda: record(connection, rerun).get("status") == "done")
    assert not connection.sismember("levers:kept:expired", rerun)
    assert done_counts(root) == {"first": 4, "second": 4}  # its stored results expired with it
    assert record(connection, rerun)["version"] == "1"  # the same content: still its name's latest

    (root / "docs" / "doc1.txt").write_text("document number 1 now says something else")
    changed = levers("submit", "docs/doc1.txt", cwd=root)
    assert changed.returncode == 0, changed.stderr
    wait_until(lambda: record(connection, changed.stdout.strip()).get("status") == "done")
    assert record(connection, changed.stdout.strip())["version"] == "2"  # numbered on from the latest
    assert connection.hlen("levers:kept:version-latest") == 2  # doc1's name has its versions again
    assert levers("failed", cwd=root).returncode == 0


def test_the_ledger_expires_done_records_keeps_their_ids_and_bounds_names(
    tmp_path: Path, connection: redis.Redis
) -> None:
    spec = load_pipeline(project(tmp_path, docs=0, retention="retention: 1") / "pipeline.yaml").spec
    ledger = Ledger(connection, "kept")
    names = [f"{'long name ' * 10}{i}.txt" for i in range(40)]
    for name in names:
        ledger.add("a" * 20, name, "files", "first", force=False)
    ledger.add("b" * 20, "b.txt", "files", "first", force=False)
    with connection.pipeline() as pipe:
        pipe.multi()
        ledger.finished("a" * 20, "first", 0.1, 0, None, pipe)
        pipe.execute()

    kept = ledger.get("a" * 20)
    assert kept is not None and kept.names == names[: len(kept.names)]
    assert len(json.dumps(kept.names).encode()) <= MAX_NAMES_BYTES
    assert int(connection.memory_usage("levers:kept:doc:" + "a" * 20) or 0) <= RECORD_BYTES

    # done before done documents had a set of their own: it sits among those not done
    connection.hset("levers:kept:doc:" + "c" * 20, mapping={"status": "done", "finished": time.time()})
    connection.zadd("levers:kept:docs", {"c" * 20: time.time()})

    retention = Retention(connection, spec)
    assert retention.adopt() == 1
    assert retention.expire() == 0  # done a moment ago: within a day
    assert retention.expire(now=time.time() + 2 * DAY_S) == 2  # the one not done stays
    assert connection.smembers("levers:kept:expired") == {b"a" * 20, b"c" * 20}
    gone = ledger.get("a" * 20)
    assert gone is not None and gone.expired and gone.status is DocStatus.DONE
    assert not connection.exists("levers:kept:doc:" + "a" * 20)
    assert ledger.get("b" * 20) is not None
    assert ledger.find("aaaa") == ["a" * 20]
    assert not ledger.add("a" * 20, "again.txt", "files", "first", force=False)
    assert ledger.add("a" * 20, "again.txt", "files", "first", force=True)
    assert not connection.sismember("levers:kept:expired", "a" * 20)
    requeued = ledger.get("a" * 20)
    assert requeued is not None and requeued.status is DocStatus.QUEUED and not requeued.expired
