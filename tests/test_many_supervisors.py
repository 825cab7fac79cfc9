"""Many supervisors on one host: one `levers up --phase X` per phase, as the Procfile runs them,
and `levers set` calls at the same time, all in one project directory on its embedded server."""

from __future__ import annotations

import multiprocessing
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from levers.observing.reports import live_reports
from levers.pipeline.loading import load_pipeline
from levers.server.connection import embedded_server
from levers.server.project import read_last_good, save_last_good
from tests.conftest import LEVERS, TOY_PHASES, StartLevers, levers, stop, wait_until

PHASES = ("a", "b", "c", "d")
PIPELINE = """\
name: four
phases:
  a: {handler: toyphases:first, accepts: [.txt], next: b, levers: {workers: 1}}
  b: {handler: toyphases:second, next: c, levers: {workers: 1}}
  c: {handler: toyphases:second, next: d, levers: {workers: 1}}
  d: {handler: toyphases:second, levers: {workers: 1}}
"""
SETS = 30
SAVES = 200


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.delenv("REDIS_URL", raising=False)
    (tmp_path / "toyphases.py").write_text(TOY_PHASES)
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    yield tmp_path
    levers("down", cwd=tmp_path)


# thirty commands starting at once on a small machine take a while; each waits for the supervisors
@pytest.mark.timeout(600)
def test_four_supervisors_survive_thirty_concurrent_sets_and_apply_the_last(
    project: Path, start_levers: StartLevers
) -> None:
    supervisors = [start_levers("up", "--phase", phase, cwd=project) for phase in PHASES]
    try:
        server = embedded_server(load_pipeline(project / "pipeline.yaml"))
        wait_until(lambda: server.running() is not None, timeout_s=60)
        connection = redis.Redis.from_url(server.running().url)  # type: ignore[union-attr]
        wait_until(lambda: len(live_reports(connection, "four")) == len(PHASES), timeout_s=60)

        sets = [
            subprocess.Popen([*LEVERS, "set", f"a.semaphore={n}", f"b.threads={n}"], cwd=project,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for n in range(1, SETS + 1)
        ]  # fmt: skip
        results = [(s.wait(timeout=300), *s.communicate()) for s in sets]
        assert [code for code, _, _ in results] == [0] * SETS, [err for _, _, err in results]

        last = load_pipeline(project / "pipeline.yaml")
        assert last.spec.phases["a"].levers.semaphore == last.spec.phases["b"].levers.threads

        def all_applied() -> bool:
            reports = live_reports(connection, "four")
            return len(reports) == len(PHASES) and all(r.digest == last.digest for r in reports)

        wait_until(all_applied, timeout_s=30)
        assert [s.poll() for s in supervisors] == [None] * len(PHASES), "every supervisor is alive"
    finally:
        outputs = [stop(s) for s in supervisors]
    assert all("Traceback" not in output for output in outputs), outputs
    assert read_last_good(project / "pipeline.yaml") == last


def _save_repeatedly(path: Path, times: int) -> None:
    loaded = load_pipeline(path)
    for _ in range(times):
        save_last_good(loaded)


def test_processes_saving_the_last_good_pipeline_at_once_never_fail(tmp_path: Path) -> None:
    (tmp_path / "pipeline.yaml").write_text(PIPELINE)
    fork = multiprocessing.get_context("fork")
    savers = [fork.Process(target=_save_repeatedly, args=(tmp_path / "pipeline.yaml", SAVES)) for _ in PHASES]
    for saver in savers:
        saver.start()
    for saver in savers:
        saver.join(timeout=120)

    assert [saver.exitcode for saver in savers] == [0] * len(PHASES)
    assert read_last_good(tmp_path / "pipeline.yaml") == load_pipeline(tmp_path / "pipeline.yaml")
    assert sorted(p.name for p in (tmp_path / ".levers").iterdir()) == [
        ".gitignore",
        "last-good-pipeline.json",
        "validated",
    ]
    # no temporary file left behind by the savers, in the validated records either
    assert [p.suffix for p in (tmp_path / ".levers" / "validated").iterdir()] == [".json"]


def test_the_bundled_pipeline_reads_back_as_the_last_good_one(tmp_path: Path) -> None:
    # its expect: blocks hold seconds or calls, not both, as a dump of every field would
    bundled = Path(__file__).resolve().parent.parent / "pipeline.yaml"
    (tmp_path / "pipeline.yaml").write_text(bundled.read_text())
    loaded = load_pipeline(tmp_path / "pipeline.yaml")
    save_last_good(loaded)
    assert read_last_good(tmp_path / "pipeline.yaml") == loaded
