"""Supervisors' leases: a host that dies has its jobs taken over once, by a live supervisor elsewhere.

The first tests drive lease keepers of fake supervisors (tests.test_supervisor's harness) on the
real server, with a fake clock; the last ones run real supervisors in separate project
directories on one server, and kill one with all its workers, or freeze it as a cut-off host.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
import redis
from rq import Queue, Worker
from rq.registry import FailedJobRegistry

from levers import keys
from levers.observing.reports import LeaseRecord, supervisor_leases
from levers.supervisor.leases import SETTLE_S, LeaseKeeper
from levers.supervisor.reconcile import SlotState
from tests.conftest import StartLevers, doc_field, levers, make_project, submit, wait_until
from tests.test_supervisor import Harness, pipeline_text

PIPELINE = "shared"


class Host:
    """A fake supervisor (its workers fake processes) and the keeper of its lease, on the real server."""

    def __init__(self, root: Path, connection: redis.Redis) -> None:
        root.mkdir()
        (root / "pipeline.yaml").write_text(f"name: {PIPELINE}\n" + pipeline_text())
        self.harness = Harness(root / "pipeline.yaml")
        self.harness.tick()  # its workers start
        self.keeper = LeaseKeeper(connection, self.harness.supervisor, clock=self.harness.clock)
        self.keeper.tick()

    def settle(self) -> None:
        """Hold the lease long enough to take over others."""
        self.harness.clock.advance(SETTLE_S)
        self.keeper.tick()

    def killed(self) -> list[bool]:
        return ["kill" in p.signals for p in self.harness.all_processes()]


@pytest.fixture
def hosts(tmp_path: Path, connection: redis.Redis) -> list[Host]:
    return [Host(tmp_path / name, connection) for name in ("a", "b", "c")]


def lapse(connection: redis.Redis, host: Host) -> None:
    """The host stops renewing: its lease expires (as it would LEASE_TTL_S after its last renewal)."""
    connection.delete(keys.lease(PIPELINE, host.keeper.id))


def test_status_lists_each_supervisor_and_marks_a_lapsed_lease(
    hosts: list[Host], connection: redis.Redis
) -> None:
    a, b, _ = hosts
    lapse(connection, a)

    shown = {s.id: s for s in supervisor_leases(connection, PIPELINE)}

    assert set(shown) == {h.keeper.id for h in hosts}
    assert (shown[a.keeper.id].lapsed, shown[b.keeper.id].lapsed) == (True, False)
    assert shown[b.keeper.id].host == socket.gethostname()
    assert shown[b.keeper.id].pid == os.getpid()
    assert shown[b.keeper.id].phases == ["chunk", "extract"]
    assert shown[b.keeper.id].workers == 3
    assert shown[b.keeper.id].version == b.harness.supervisor.watcher.current().digest[:12]
    assert shown[b.keeper.id].lease_age_s is not None and shown[b.keeper.id].lease_age_s < 5


def test_a_lapsed_lease_is_taken_over_once_among_racing_supervisors(
    hosts: list[Host], connection: redis.Redis
) -> None:
    _, b, c = hosts
    gone = {f"gone-{i}" for i in range(30)}
    for supervisor in gone:  # leases that lapsed: records without a live lease
        record = LeaseRecord(
            "lost-host", 1, ["extract"], "v1", {"extract": [f"extract.lost-host.{supervisor}"]}
        )
        connection.hset(keys.lease_records(PIPELINE), supervisor, record.to_json())
    taken: dict[str, list[str]] = {}
    start = threading.Barrier(2)

    def take_over(host: Host) -> None:
        start.wait()
        taken[host.keeper.id] = host.keeper.take_over_lapsed()

    racers = [threading.Thread(target=take_over, args=(h,)) for h in (b, c)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join()

    by_b, by_c = taken[b.keeper.id], taken[c.keeper.id]
    assert set(by_b) | set(by_c) >= gone
    assert not set(by_b) & set(by_c)
    assert not set(by_b + by_c) & {h.keeper.id for h in hosts}
    assert not gone & {s.id for s in supervisor_leases(connection, PIPELINE)}


def test_no_supervisor_takes_over_before_it_has_held_its_own_lease_for_the_settle_time(
    hosts: list[Host], connection: redis.Redis
) -> None:
    # after a Redis outage every lease has lapsed: each supervisor gets time to renew its own
    a, b, c = hosts
    lapse(connection, a)
    lapse(connection, c)
    b.harness.clock.advance(SETTLE_S - 0.5)
    b.keeper.tick()
    c.keeper.tick()  # back in time: renewed

    assert {s.id for s in supervisor_leases(connection, PIPELINE) if s.lapsed} == {a.keeper.id}
    b.harness.clock.advance(0.5)
    b.keeper.tick()
    assert {s.id for s in supervisor_leases(connection, PIPELINE)} == {b.keeper.id, c.keeper.id}
    assert not any(c.killed())


def test_a_supervisor_back_after_its_lease_was_taken_over_replaces_its_workers(
    hosts: list[Host], connection: redis.Redis
) -> None:
    a, b, _ = hosts
    b.settle()
    lapse(connection, a)
    assert b.keeper.take_over_lapsed() == [a.keeper.id]
    taken_id = a.keeper.id

    a.keeper.tick()  # back: its lease is gone, its workers' jobs went elsewhere

    assert all(a.killed())
    assert {s.state for s in a.harness.supervisor.slots} == {SlotState.CUT_SHORT}
    assert not any(b.killed())
    a.keeper.tick()  # a new lease
    assert a.keeper.id != taken_id
    assert a.keeper.id in {s.id for s in supervisor_leases(connection, PIPELINE) if not s.lapsed}


def test_a_lease_renewed_before_anyone_claims_it_is_kept(hosts: list[Host], connection: redis.Redis) -> None:
    a, b, _ = hosts
    b.settle()
    lapse(connection, a)
    a.keeper.tick()  # cut off for a moment only

    assert b.keeper.take_over_lapsed() == []
    assert not any(a.killed())


def test_a_malformed_lease_record_is_taken_over_without_a_crash(
    hosts: list[Host], connection: redis.Redis
) -> None:
    _, b, _ = hosts
    connection.hset(keys.lease_records(PIPELINE), "hostile", '{"host": ["x"], "workers": 7}')

    assert b.keeper.take_over_lapsed() == ["hostile"]


# --- real supervisors, in separate project directories on one server ------------------------------

HOST_PHASES = """
import os
import time
from pathlib import Path

def first(doc, ctx):
    gate = ctx.options.get("gate")
    while gate and not Path(gate).exists():  # this host's copy runs until the test opens the gate
        time.sleep(0.05)
    return {"pid": os.getpid()}

def second(doc, ctx):
    return {"first_ran_in": doc.input["pid"]}
"""

HOST_PIPELINE = """
name: toy
store: {store}
phases:
  first:
    handler: toyphases:first
    accepts: [.txt]
    next: second
    levers: {{workers: 1}}
    options: {{gate: {gate}}}
  second:
    handler: toyphases:second
    levers: {{workers: 1}}
"""


def host_project(tmp_path: Path, name: str, gate: Path | None) -> Path:
    """A project directory of its own, with its own copy of the pipeline: same name, same queues,
    one shared artifact store (as on machines sharing a volume)."""
    root = make_project(_mkdir(tmp_path / name), docs=1)
    (root / "toyphases.py").write_text(HOST_PHASES)
    gate_value = json.dumps(str(gate)) if gate else "null"
    (root / "pipeline.yaml").write_text(HOST_PIPELINE.format(store=tmp_path / "store", gate=gate_value))
    return root


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def kill_host(process: subprocess.Popen[str]) -> None:
    """kill -9 a supervisor and every process under it, at once, as when its machine dies."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(process.pid)
        for victim in [parent, *parent.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
    process.wait(timeout=30)


def first_workers(connection: redis.Redis) -> list[Worker]:
    return Worker.all(queue=Queue("toy.first", connection=connection))


def ran_once(connection: redis.Redis, doc: str) -> None:
    """The document went through each phase once: one hand-off, one run of the next phase."""
    assert doc_field(connection, doc, "status") == "done"
    assert connection.hget("levers:toy:phase:first:totals", "done") == b"1"
    assert connection.hget("levers:toy:phase:second:totals", "done") == b"1"
    assert doc_field(connection, doc, "second:attempts") == "1"
    assert Queue("toy.first", connection=connection).count == 0
    assert Queue("toy.second", connection=connection).count == 0
    assert FailedJobRegistry("toy.first", connection=connection).count == 0


def test_a_dead_hosts_job_completes_once_on_the_other_host(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    a = host_project(tmp_path, "a", gate=tmp_path / "never")  # its copy of the job never ends
    b = host_project(tmp_path, "b", gate=None)
    host_a = start_levers("up", cwd=a)
    host_b: subprocess.Popen[str] | None = None
    try:
        [doc] = submit(a, "docs")
        wait_until(lambda: doc_field(connection, doc, "status") == "running")
        host_b = start_levers("up", cwd=b)
        wait_until(lambda: len(first_workers(connection)) == 2)

        kill_host(host_a)

        wait_until(lambda: doc_field(connection, doc, "status") == "done", timeout_s=60)
        status = json.loads(levers("status", "--json", cwd=b).stdout)
        shown = levers("show", doc, cwd=b)
    finally:
        kill_host(host_a)
        if host_b is not None:
            host_b.send_signal(signal.SIGTERM)
            host_b.communicate(timeout=60)
    ran_once(connection, doc)
    assert doc_field(connection, doc, "first:attempts") == "2"
    lost = doc_field(connection, doc, "first:lost") or ""
    assert lost.startswith(f"host {socket.gethostname()} lost") and f"pid {host_a.pid}" in lost
    assert [s["pid"] for s in status["supervisors"]] == [host_b.pid]
    assert f"host {socket.gethostname()} lost" in " ".join(shown.stdout.split())


def test_a_cut_off_host_that_comes_back_hands_nothing_off_twice(
    tmp_path: Path, connection: redis.Redis, start_levers: StartLevers
) -> None:
    gate = tmp_path / "gate"
    a = host_project(tmp_path, "a", gate=gate)
    b = host_project(tmp_path, "b", gate=None)
    host_a = start_levers("up", "--phase", "first", cwd=a)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(host_a.stdout or []), daemon=True)
    reader.start()
    host_b: subprocess.Popen[str] | None = None
    try:
        [doc] = submit(a, "docs")
        wait_until(lambda: doc_field(connection, doc, "status") == "running")
        [worker_a] = first_workers(connection)
        host_b = start_levers("up", cwd=b)
        wait_until(lambda: len(first_workers(connection)) == 2)
        before = {w.name for w in first_workers(connection)}

        os.kill(host_a.pid, signal.SIGSTOP)  # cut off: its supervisor renews nothing, its worker runs on
        wait_until(lambda: doc_field(connection, doc, "status") == "done", timeout_s=60)
        gate.touch()  # the cut-off worker's copy of the job ends now, after the document moved on
        wait_until(lambda: any("outcome is dropped" in line for line in said))
        os.kill(host_a.pid, signal.SIGCONT)

        wait_until(lambda: any("took over its jobs" in line for line in said))
        # a new worker in place of the one whose job went elsewhere
        wait_until(lambda: len({w.name for w in first_workers(connection)} - before) == 1)
        host_a.send_signal(signal.SIGTERM)
        host_a.wait(timeout=60)
    finally:
        kill_host(host_a)
        reader.join(timeout=10)
        if host_b is not None:
            host_b.send_signal(signal.SIGTERM)
            host_b.communicate(timeout=60)
    ran_once(connection, doc)
    assert doc_field(connection, doc, "first:attempts") == "2"
    store = tmp_path / "store" / doc
    ran_in = json.loads((store / "second.json").read_text())["first_ran_in"]
    assert ran_in == json.loads((store / "first.json").read_text())["pid"] != worker_a.pid
