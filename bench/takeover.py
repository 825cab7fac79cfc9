"""How long a dead host's job waits: from kill -9 of a host (its supervisor and every process under
it) to the job running on another host, with levers' default lease settings.

Two project directories on one private server, each with its own copy of a one-phase pipeline:
the same name (so the same queue) and one shared artifact store, as on two machines. Host B runs
`levers up` throughout and has held its lease for longer than SETTLE_S, as a host that has been up
for a while has. Each run starts host A (`levers up --workers 1` in the other directory, whose
environment makes the phase hold its job until killed: both hosts follow one published pipeline);
submits one document, which A's worker takes; gives B a worker for the phase (`levers set`, so
that the document could go nowhere else before); kills A and all its processes at once; and reads
two moments off levers' ledger, polled every 10 ms: when the document records its host as lost
(B took the lease over and requeued the job), and when its second attempt starts (B's worker runs
it).

RQ alone recovers such a job only once its worker's key has expired and a maintenance pass has
found its abandoned entry in the started registry: RQ's defaults give about 11.5 minutes (600 s
between maintenance passes, after the dead worker's heartbeat TTL).
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import redis
from rq import Queue, Worker

from bench.common import PYTHON, Server, bench_env, md_table, median, stop_process, verdict, wait_until
from levers import keys
from levers.observing.reports import supervisor_leases
from levers.supervisor.leases import LEASE_TTL_S, SCAN_S, SETTLE_S

TARGET_S = 30.0
RQ_ALONE_S = 11.5 * 60
POLL_S = 0.01
START_TIMEOUT_S = 120.0
SECTION = "## 7. Host takeover: a dead host's job running elsewhere"

# Set for host A's processes only: both hosts run one published pipeline, so what differs between
# them is their environment and their `levers up --workers`.
HOLD_ENV = "TAKEOVER_HOLD"
PHASE = f'''"""The takeover benchmark's phase: where {HOLD_ENV} is set it keeps its job till killed."""

import os
import time


def work(doc, ctx):
    while os.environ.get("{HOLD_ENV}"):
        time.sleep(1)
    return {{}}
'''

PIPELINE_NAME = "takeover"
PIPELINE = """name: takeover
store: {store}
phases:
  work:
    handler: takeover_phase:work
    accepts: [.txt]
    levers: {{workers: 0}}
"""


@dataclass(frozen=True)
class Takeover:
    requeued_s: float  # from the kill to the document recording its host as lost
    running_s: float  # from the kill to its next attempt starting on the other host


def run(server: Server, runs: int, progress: Callable[[str], None]) -> list[Takeover]:
    server.connection.flushall()
    with tempfile.TemporaryDirectory(prefix="levers-bench-takeover-") as tmp:
        root = Path(tmp)
        host_a, host_b = _project(root, "a"), _project(root, "b")
        b = _up(server, host_b)
        try:
            wait_until(lambda: supervisor_leases(server.connection, PIPELINE_NAME), START_TIMEOUT_S, "host B")
            time.sleep(SETTLE_S + 1)  # B has held its lease long enough to take others over
            results = []
            for n in range(runs):
                results.append(_one(server, host_a, host_b, n))
                seconds = f"{results[-1].requeued_s:.1f} s, running after {results[-1].running_s:.1f} s"
                progress(f"  run {n + 1}: requeued after {seconds}")
            return results
        finally:
            stop_process(b)


def _one(server: Server, host_a: Path, host_b: Path, n: int) -> Takeover:
    a = _up(server, host_a, holding=True)
    try:
        wait_until(lambda: _listening(server) == 1, START_TIMEOUT_S, "host A's worker")
        (host_a / f"doc{n}.txt").write_text(f"document {n}")
        [doc] = _levers(server, host_a, "submit", f"doc{n}.txt").split()
        field = _doc_field(server.connection, doc)
        wait_until(lambda: field("status") == "running", START_TIMEOUT_S, "host A to take the document")
        _levers(server, host_b, "set", "work.workers=1")
        wait_until(lambda: _listening(server) == 2, START_TIMEOUT_S, "host B's worker")
        killed = _kill_host(a)
        requeued = _poll_until(lambda: field("work:lost") is not None)
        wait_until(lambda: field("work:attempts") == "2", 60, "the job to run on host B")
        running = float(field("work:started") or "nan")
        wait_until(lambda: field("status") == "done", 60, "the document to finish")
        _levers(server, host_b, "set", "work.workers=0")
        wait_until(lambda: _listening(server) == 0, START_TIMEOUT_S, "host B's worker to retire")
        return Takeover(requeued - killed, running - killed)
    finally:
        _kill_host(a)


def _project(root: Path, name: str) -> Path:
    project = root / name
    project.mkdir()
    (project / "takeover_phase.py").write_text(PHASE)
    (project / "pipeline.yaml").write_text(PIPELINE.format(store=root / "store"))
    return project


def _up(server: Server, project: Path, holding: bool = False) -> subprocess.Popen[bytes]:
    """`levers up` in ``project``; ``holding``: one worker, whatever the pipeline says, whose jobs
    hold until it is killed."""
    log = (project / "levers-up.log").open("ab")
    env = bench_env(REDIS_URL=server.url, **({HOLD_ENV: "1"} if holding else {}))
    process = subprocess.Popen(
        [PYTHON, "-m", "levers", "up", *(["--workers", "1"] if holding else [])], cwd=project, env=env,
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()
    return process


def _levers(server: Server, project: Path, *args: str) -> str:
    done = subprocess.run(
        [PYTHON, "-m", "levers", *args], cwd=project, env=bench_env(REDIS_URL=server.url),
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout


def _listening(server: Server) -> int:
    queue = Queue(keys.queue_name(PIPELINE_NAME, "work"), connection=server.connection)
    return len(Worker.all(queue=queue))


def _doc_field(connection: redis.Redis, doc: str) -> Callable[[str], str | None]:
    def field(name: str) -> str | None:
        value = connection.hget(keys.document(PIPELINE_NAME, doc), name)
        return value.decode() if value is not None else None

    return field


def _kill_host(process: subprocess.Popen[bytes]) -> float:
    """kill -9 the supervisor and everything under it at once; when it happened (time.time())."""
    with contextlib.suppress(psutil.NoSuchProcess):
        parent = psutil.Process(process.pid)
        victims = [parent, *parent.children(recursive=True)]
        at = time.time()
        for victim in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                victim.kill()
        process.wait(timeout=30)
        return at
    process.wait(timeout=30)
    return time.time()


def _poll_until(predicate: Callable[[], bool]) -> float:
    """When ``predicate`` first held (time.time()), polling every POLL_S."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(POLL_S)
    raise TimeoutError("timed out waiting for the takeover")


def render(results: list[Takeover], run_line: str) -> str:
    rows = [[n, f"{r.requeued_s:.1f}", f"{r.running_s:.1f}"] for n, r in enumerate(results, 1)]
    table = md_table(["run", "job requeued by host B, s", "job running on host B, s"], rows)
    running = [r.running_s for r in results]
    worst = max(running)
    return f"""{SECTION}

{run_line}

From kill -9 of host A (its `levers up` and every process under it, at once, while its worker
runs the document's job) to the job running on host B, another `levers up` in another project
directory on the same server, with the default lease settings: a lease lapses {LEASE_TTL_S:g} s
after its last renewal, live supervisors look for lapsed leases every {SCAN_S:g} s (once they
have held their own for {SETTLE_S:g} s). Times from levers' ledger, polled every {POLL_S * 1000:.0f} ms.

{table}

Median **{median(running):.1f} s** from the host's death to its job running elsewhere (worst
{worst:.1f} s; target ≤ {TARGET_S:.0f} s: **{verdict(worst <= TARGET_S)}**). Nearly all of it is
the lease's {LEASE_TTL_S:g} s. RQ alone (not measured here) recovers such a job after about
{RQ_ALONE_S / 60:.1f} minutes with its defaults: its maintenance pass every 600 s, after the dead
worker's heartbeat TTL.
"""
