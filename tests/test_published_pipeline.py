"""One lever change, every host: the pipeline published in Redis, followed by every supervisor.

Two project directories stand for two hosts: each has its own copy of pipeline.yaml and its own
`levers up`, both on one real server (REDIS_URL), sharing one artifact store.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import redis

from levers import keys
from levers.observing.reports import live_reports
from levers.pipeline.loading import parse_pipeline
from levers.pipeline.published import live_version, publish, read_published
from levers.pipeline.publishing import set_in_file
from levers.pipeline.watching import PipelineWatcher
from levers.supervisor.following import Follower
from tests.conftest import TOY_PHASES, StartLevers, levers, stop, submit, wait_until

PIPELINE = """\
name: toy
store: {store}
phases:
  first:
    handler: toyphases:first
    accepts: [.txt]
    next: second
    levers: {{workers: 1}}   # one to start with
  second:
    handler: toyphases:second
    levers: {{workers: 1}}
"""


def host(root: Path, store: Path) -> Path:
    """A project directory, as one host has it."""
    root.mkdir()
    (root / "toyphases.py").write_text(TOY_PHASES)
    (root / "pipeline.yaml").write_text(PIPELINE.format(store=store))
    (root / "docs").mkdir()
    for i in range(2):
        (root / "docs" / f"doc{i}.txt").write_text(f"document {i}")
    return root


def report_of(connection: redis.Redis, pid: int, phase: str) -> tuple[int, int, int | None] | None:
    """(desired, alive, version) of ``phase`` as the supervisor ``pid`` last reported it."""
    for report in live_reports(connection, "toy"):
        if report.pid == pid and phase in report.phases:
            return report.phases[phase].desired, report.phases[phase].alive, report.version
    return None


def first_output(store: Path, doc_id: str) -> dict[str, int] | None:
    path = store / doc_id / "first.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.mark.timeout(300)
def test_a_set_in_one_directory_reaches_the_supervisor_and_workers_of_another(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    store = tmp_path / "store"
    a, b = host(tmp_path / "a", store), host(tmp_path / "b", store)
    b_file = (b / "pipeline.yaml").read_bytes()
    up_a = start_levers("up", "--phase", "second", cwd=a)
    up_b = start_levers("up", "--phase", "first", cwd=b)
    try:
        wait_until(lambda: report_of(connection, up_b.pid, "first") == (1, 1, 1))
        wait_until(lambda: report_of(connection, up_a.pid, "second") == (1, 1, 1))

        changed = levers("set", "first.workers=2", "first.semaphore=7", cwd=a)
        assert changed.returncode == 0, changed.stderr
        assert "published as version v2" in changed.stderr
        assert "applied by 2 supervisor(s)" in changed.stderr
        # b's supervisor runs two workers; its workers' jobs see the semaphore set in a
        wait_until(lambda: report_of(connection, up_b.pid, "first") == (2, 2, 2))
        [doc] = submit(a, "docs/doc0.txt")
        wait_until(lambda: first_output(store, doc) is not None)
        assert first_output(store, doc)["semaphore"] == 7  # type: ignore[index]
        assert "semaphore: 7" in (a / "pipeline.yaml").read_text()
        assert (b / "pipeline.yaml").read_bytes() == b_file  # b's copy is not touched

        status = levers("status", "--json", cwd=b)
        assert status.returncode == 0, status.stderr
        versions = json.loads(status.stdout)["pipeline_version"]
        assert versions["live"].startswith("v2 ")
        assert json.loads(status.stdout)["stores"] == []  # one store, shared: nothing to say
        assert versions["drift"] == ["first.workers: 1 in pipeline.yaml, 2 live",
                                     "first.semaphore: 1 in pipeline.yaml, 7 live"]  # fmt: skip
        assert set(versions["supervisors"].values()) == {versions["live"]}
        shown = levers("status", cwd=b).stdout
        assert "drift: first.semaphore: 1 in pipeline.yaml, 7 live" in shown
        assert shown.count(versions["live"]) == 3  # the live version, and each supervisor's

        # a bad value is refused where it is set, and nothing changes anywhere
        refused = levers("set", "first.semaphore=0", cwd=b)
        assert refused.returncode == 2
        assert "first.levers.semaphore" in refused.stderr
        assert (b / "pipeline.yaml").read_bytes() == b_file
        assert live_version(connection, "toy").number == 2  # type: ignore[union-attr]
    finally:
        stop(up_a)
        stop(up_b)
    assert up_a.returncode == 0 and up_b.returncode == 0


def test_status_says_when_supervisors_use_stores_of_their_own(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    """Two directories on one Redis, each with the default store under its own .levers/: a phase
    run by one cannot read what the other's stored."""
    a, b = host(tmp_path / "a", Path(".levers/artifacts")), host(tmp_path / "b", Path(".levers/artifacts"))
    up_a = start_levers("up", "--phase", "second", cwd=a)
    up_b = start_levers("up", "--phase", "first", cwd=b)
    try:
        wait_until(lambda: report_of(connection, up_a.pid, "second") is not None)
        wait_until(lambda: report_of(connection, up_b.pid, "first") is not None)

        stores = json.loads(levers("status", "--json", cwd=a).stdout)["stores"]
        shown = levers("status", cwd=a).stdout
    finally:
        stop(up_a)
        stop(up_b)
    projects = {store.split(":", 1)[1].removesuffix("/.levers/artifacts") for store in stores}
    assert projects == {str(a.resolve()), str(b.resolve())}
    said = " ".join(shown.split())  # the line wraps at the output's width, as long as the paths are
    assert "the supervisors use 2 artifact stores" in said and "give every host one store:" in said


@pytest.mark.timeout(300)
def test_a_hostile_version_in_redis_is_refused_by_every_supervisor_and_changes_nothing(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    store = tmp_path / "store"
    a, b = host(tmp_path / "a", store), host(tmp_path / "b", store)
    up_a = start_levers("up", "--phase", "second", cwd=a)
    up_b = start_levers("up", "--phase", "first", cwd=b)
    try:
        wait_until(lambda: report_of(connection, up_b.pid, "first") == (1, 1, 1))
        wait_until(lambda: report_of(connection, up_a.pid, "second") == (1, 1, 1))
        # numbered and hashed as a publish would, but a semaphore the model refuses
        text = PIPELINE.format(store=store).replace("{workers: 1}", "{workers: 4, semaphore: 0}", 1).encode()
        record = {"number": 2, "digest": hashlib.sha256(text).hexdigest(), "text": text, "by": "someone"}
        connection.hset(keys.published_pipeline("toy"), mapping=record)

        def refused_by(pid: int) -> bool:
            return any(r.pid == pid and r.config_error and "v2" in r.config_error
                       for r in live_reports(connection, "toy"))  # fmt: skip

        wait_until(lambda: refused_by(up_a.pid) and refused_by(up_b.pid))
        assert report_of(connection, up_b.pid, "first") == (1, 1, 1)
        status = json.loads(levers("status", "--json", cwd=a).stdout)
        assert "semaphore" in status["config_error"] and "refused" in status["config_error"]
        running = f"v1 {hashlib.sha256((a / 'pipeline.yaml').read_bytes()).hexdigest()[:8]}"
        hostile = f"v2 {hashlib.sha256(text).hexdigest()[:8]}"
        drift = status["pipeline_version"]["drift"]
        assert sum(line.endswith(f"runs {running}, not the live {hostile}") for line in drift) == 2, drift
        assert any(line.startswith("the live version is invalid") for line in drift), drift
        # the next valid version is followed again
        fixed = levers("set", "first.workers=2", cwd=a)
        assert fixed.returncode == 0, fixed.stderr
        wait_until(lambda: report_of(connection, up_b.pid, "first") == (2, 2, 3))
    finally:
        stop(up_a)
        stop(up_b)


def test_a_start_publishes_a_new_file_and_follows_the_newest_version_over_an_older_copy(
    tmp_path: Path, connection: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    store = tmp_path / "store"
    a, b = host(tmp_path / "a", store), host(tmp_path / "b", store)
    first = follower(a, connection)
    first.tick()
    assert first.version is not None and first.version.number == 1

    set_in_file(a / "pipeline.yaml", ["first.semaphore=15"], connection, "test")
    assert live_version(connection, "toy").number == 2  # type: ignore[union-attr]

    # b deploys the file as it was before the set: an older copy follows the newest version
    with caplog.at_level(logging.INFO, logger="levers.supervisor.reconcile"):
        stale = follower(b, connection)
        stale.tick()
    assert stale.version == live_version(connection, "toy")
    assert stale.watcher.current().spec.phases["first"].levers.semaphore == 15
    assert "pipeline.yaml here is the published v1; following the newest, v2" in caplog.text
    assert "first.semaphore: 1 in pipeline.yaml, 15 live" in caplog.text
    assert b"semaphore: 15" in stale.copy.read_bytes()  # what its workers read

    # b deploys a changed file: it is published, and a follows it
    (b / "pipeline.yaml").write_text(PIPELINE.format(store=store).replace("{workers: 1}", "{workers: 3}", 1))
    deployed = follower(b, connection)
    deployed.tick()
    assert deployed.version is not None and deployed.version.number == 3
    first.tick()
    assert first.version == deployed.version
    assert first.watcher.current().spec.phases["first"].levers.workers == 3


def test_a_set_on_an_older_copy_builds_on_the_newest_version(tmp_path: Path, connection: redis.Redis) -> None:
    store = tmp_path / "store"
    a, b = host(tmp_path / "a", store), host(tmp_path / "b", store)
    follower(a, connection).tick()
    set_in_file(a / "pipeline.yaml", ["first.semaphore=15"], connection, "test")

    outcome = set_in_file(b / "pipeline.yaml", ["first.workers=4"], connection, "test")

    assert outcome.caught_up is not None and outcome.caught_up.number == 2
    assert outcome.behind == ("first.semaphore: 1 in pipeline.yaml, 15 live",)
    live = read_published(connection, "toy")
    assert live is not None and live.version.number == 3
    text = (b / "pipeline.yaml").read_text()
    assert text == live.text.decode()
    assert "workers: 4" in text and "semaphore: 15" in text and "# one to start with" in text  # comments kept


def test_a_set_does_not_publish_over_a_version_it_did_not_start_from(
    tmp_path: Path, connection: redis.Redis
) -> None:
    a = host(tmp_path / "a", tmp_path / "store")
    original = PipelineWatcher.open(a / "pipeline.yaml").current()
    assert publish(connection, original, "test").outcome == "published"
    edited = set_in_file(a / "pipeline.yaml", ["first.workers=2"], connection, "test").updated
    # a publish that started from the first version comes after another: it is not made
    stale = publish(connection, original, "test", over=original.digest)
    assert stale.outcome == "conflict"
    assert live_version(connection, "toy").digest == edited.digest  # type: ignore[union-attr]


def test_a_set_without_a_file_edits_the_published_version(tmp_path: Path, connection: redis.Redis) -> None:
    a = host(tmp_path / "a", tmp_path / "store")
    follower(a, connection).tick()
    laptop = tmp_path / "laptop"
    laptop.mkdir()

    changed = levers("set", "first.semaphore=9", cwd=laptop)
    assert changed.returncode == 0, changed.stderr
    assert "published as version v2" in changed.stderr
    live = read_published(connection, "toy")
    assert live is not None and b"semaphore: 9" in live.text and b"# one to start with" in live.text
    assert not (laptop / "pipeline.yaml").exists()

    refused = levers("set", "first.semaphore=0", cwd=laptop)
    assert refused.returncode == 2
    assert "semaphore" in refused.stderr
    assert live_version(connection, "toy").number == 2  # type: ignore[union-attr]

    unknown = levers("set", "--pipeline", "other", "first.semaphore=3", cwd=laptop)
    assert unknown.returncode == 2
    assert "no version of pipeline 'other' is published" in unknown.stderr


def test_status_without_a_file_shows_the_published_version(tmp_path: Path, connection: redis.Redis) -> None:
    a = host(tmp_path / "a", tmp_path / "store")
    follower(a, connection).tick()
    laptop = tmp_path / "laptop"
    laptop.mkdir()
    assert levers("set", "first.semaphore=7", cwd=laptop).returncode == 0

    shown = levers("status", "--json", cwd=laptop)

    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["pipeline"] == "toy"
    assert {p["phase"]: p["semaphore"] for p in status["phases"]} == {"first": 7, "second": 1}
    assert status["pipeline_version"]["live"].startswith("v2 ")
    got = levers("get", "first.semaphore", cwd=laptop)
    assert (got.returncode, got.stdout.strip()) == (0, "7")
    unknown = levers("status", "--pipeline", "other", cwd=laptop)
    assert unknown.returncode == 2
    assert unknown.stderr.strip().count("\n") == 0 and "no version of pipeline 'other'" in unknown.stderr


def follower(root: Path, connection: redis.Redis) -> Follower:
    """What a supervisor in ``root`` runs to follow the published pipeline."""
    watcher = PipelineWatcher.open(root / "pipeline.yaml")
    return Follower(connection, watcher, root / ".levers" / "live" / "test.yaml", f"test in {root.name}")


def test_an_adopted_version_stays_until_the_file_itself_changes(tmp_path: Path) -> None:
    root = host(tmp_path / "a", tmp_path / "store")
    path = root / "pipeline.yaml"
    watcher = PipelineWatcher.open(path)
    published = parse_pipeline(path.read_bytes().replace(b"{workers: 1}", b"{workers: 5}", 1), path)

    watcher.adopt(published)
    path.write_bytes(path.read_bytes())  # written again, the same content: not an edit
    assert watcher.current() is published

    path.write_bytes(path.read_bytes().replace(b"{workers: 1}", b"{workers: 2}", 1))
    assert watcher.current().spec.phases["first"].levers.workers == 2
