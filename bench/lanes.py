"""Priority lanes: how long a high-priority document waits to start behind 1,000 low-priority ones.

A one-phase pipeline whose handler sleeps ``--job-ms`` (default 200 ms: short enough that each
worker takes its next job ahead while one runs) on ``--workers`` workers (default 2), its
1,000 low-priority documents queued before `levers up` starts. Once the workers are busy,
``--highs`` high-priority documents (default 30) are submitted one at a time, 1 to 3 job
durations apart (seeded), in memory through levers' Submitter. A document's wait is from its
submission (the ledger's ``submitted``) to the moment its handler starts (the handler's own clock,
returned in its output), over the median job duration of the run (the ledger's per-phase
seconds): the figure is a multiple of one job (target: p95 at most 1). A worker that took a low
job ahead while one ran gives it back for a high one that came in since.

``bin/bench lanes [--highs N] [--job-ms MS] [--workers N] [--output FILE]`` writes its own section
of RESULTS.md, replacing the one a previous run wrote, and leaves the other sections as they are.
"""

from __future__ import annotations

import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from bench.common import (
    PYTHON,
    RunHeader,
    Server,
    bench_env,
    bench_parser,
    embedded_server,
    md_table,
    median,
    stop_process,
    wait_until,
    write_section,
)
from levers import keys
from levers.documents.ledger import DocStatus, Ledger
from levers.documents.store import ArtifactStore, project_store
from levers.documents.submission import Submitter
from levers.pipeline.loading import load_pipeline

SECTION = "## 12. Priority lanes: a high-priority document behind 1,000 low ones"
TARGET_JOBS = 1.0
LOWS = 1000
PIPELINE = "lanesbench"
PHASE = "work"
RUN_TIMEOUT_S = 600.0

HANDLER = """
import time

def work(doc, ctx):
    started = time.time()
    time.sleep(float(ctx.options["seconds"]))
    return {"started": started}
"""

PROJECT = """
name: lanesbench
phases:
  work:
    handler: lanesphase:work
    accepts: [.txt]
    input: bytes
    retries: 0
    levers: {{workers: {workers}}}
    options: {{seconds: {seconds}}}
"""


@dataclass(frozen=True)
class Result:
    waits_s: list[float]
    job_s: float
    workers: int
    highs: int
    lows_done: int
    low_share: float  # the low lane's share of the dequeues while the high documents came in


def main(argv: list[str]) -> int:
    parser = bench_parser(
        "lanes",
        __doc__,
        {
            "--highs": (30, "high-priority documents, one at a time"),
            "--job-ms": (200, "how long one job sleeps"),
            "--workers": (2, "workers of the phase"),
        },
    )
    args = parser.parse_args(argv)
    header = RunHeader.start(["lanes", *argv])
    with embedded_server() as server:
        result = run(server, args.highs, args.job_ms / 1000, args.workers)
    write_section(args.output, SECTION, render(result, header.line()))
    return 0


def run(server: Server, highs: int, job_s: float, workers: int) -> Result:
    server.connection.flushall()
    with tempfile.TemporaryDirectory(prefix="levers-bench-lanes-") as tmp:
        project = Path(tmp)
        (project / "lanesphase.py").write_text(HANDLER)
        (project / "pipeline.yaml").write_text(PROJECT.format(workers=workers, seconds=job_s))
        loaded = load_pipeline(project / "pipeline.yaml")
        submitter = Submitter(loaded, server.connection)
        for i in range(LOWS):
            submitter.submit_bytes(f"low document {i}".encode(), f"low{i}.txt", priority="low")
        up: subprocess.Popen[bytes] = subprocess.Popen(
            [PYTHON, "-m", "levers", "up"], cwd=project, env=bench_env(REDIS_URL=server.url),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            state = keys.lane_state(keys.queue_name(PIPELINE, PHASE))
            wait_until(lambda: int(server.connection.hget(state, "taken:low") or 0) >= 2 * workers,
                       RUN_TIMEOUT_S, "the workers to start on the low documents")  # fmt: skip
            before = _taken(server, state)
            ids = _submit_highs(submitter, highs, job_s)
            ledger = Ledger(server.connection, PIPELINE)
            wait_until(lambda: all(r and r.status is DocStatus.DONE for r in ledger.get_many(ids)),
                       RUN_TIMEOUT_S, "the high-priority documents")  # fmt: skip
            after = _taken(server, state)
        finally:
            stop_process(up)
        return _measured(server, project_store(loaded), ids, workers, before, after)


def _submit_highs(submitter: Submitter, highs: int, job_s: float) -> list[str]:
    pick = random.Random(14)
    ids = []
    for i in range(highs):
        time.sleep(pick.uniform(1.0, 3.0) * job_s)  # arrivals spread over the jobs' phases
        outcome = submitter.submit_bytes(f"urgent document {i}".encode(), f"high{i}.txt", priority="high")
        assert outcome.doc_id is not None
        ids.append(outcome.doc_id)
    return ids


def _taken(server: Server, state: str) -> dict[str, int]:
    raw = server.connection.hgetall(state)
    return {lane: int(raw.get(f"taken:{lane}".encode(), 0)) for lane in keys.LANES}


def _measured(
    server: Server, store: ArtifactStore, ids: list[str], workers: int, before: dict[str, int],
    after: dict[str, int],
) -> Result:  # fmt: skip
    ledger = Ledger(server.connection, PIPELINE)
    waits = []
    for record in ledger.get_many(ids):
        assert record is not None
        waits.append(float(store.output(record.id, PHASE)["started"]) - record.submitted)
    members = cast(list[bytes], server.connection.zrange(keys.finished(PIPELINE), 0, -1))
    done = [member.decode() for member in members]
    records = [r for r in ledger.get_many(done) if r is not None and r.status is DocStatus.DONE]
    seconds = [r.phases[PHASE].seconds or 0.0 for r in records]
    taken = {lane: after[lane] - before[lane] for lane in keys.LANES}
    return Result(
        waits_s=sorted(waits), job_s=median(seconds), workers=workers, highs=len(ids),
        lows_done=sum(r.priority == "low" for r in records),
        low_share=taken["low"] / max(1, sum(taken.values())),
    )  # fmt: skip


def _quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted ``values``."""
    return values[min(len(values) - 1, max(0, round(q * len(values) + 0.5) - 1))]


def render(result: Result, run_line: str) -> str:
    job = result.job_s
    rows = [
        (name, f"{_quantile(result.waits_s, q) * 1000:.0f}", f"{_quantile(result.waits_s, q) / job:.2f}")
        for name, q in (("p50", 0.5), ("p95", 0.95), ("max", 1.0))
    ]
    p95 = _quantile(result.waits_s, 0.95) / job
    verdict = "meets" if p95 <= TARGET_JOBS else "misses"
    return (
        f"{SECTION}\n\n{run_line}\n\n"
        f"{LOWS:,} low-priority documents queued, then {result.highs} high-priority ones submitted one "
        f"at a time, 1 to 3 job durations apart, to {result.workers} workers whose jobs take "
        f"{job * 1000:.0f} ms (median). Wait: from a document's submission to its handler's start.\n\n"
        + md_table(("high-priority wait", "ms", "× one job"), rows)
        + f"\n\np95 = {p95:.2f} job durations: {verdict} the target of at most {TARGET_JOBS:g}. "
        f"{result.lows_done:,} low-priority documents were done by the end: between the high ones the "
        f"workers went on with them ({result.low_share:.0%} of the dequeues meanwhile).\n"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
