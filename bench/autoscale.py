"""Autoscaling against fixed worker counts: drain time of a burst, worker-seconds of a bursty day.

One phase whose jobs sleep 200 ms runs under the real `levers up`, in three variants taking turns
on one server (flushed between runs): fixed 1 worker, fixed 6, and `autoscale: {min: 1, max: 6,
per_worker: 4, scale_down_after: 10}` starting from 1. Each variant gets, once its workers are idle:

- a burst: 300 documents submitted at once; drain time from the first submission to the last
  document done (levers' ledger);
- a bursty trace: bursts of 100 documents every GAP_S seconds with idle time between, three
  times; worker-seconds are the worker processes alive (the supervisor's reports, retiring
  workers included) integrated over the trace, from the first burst until the last is done and
  the phase is back at its idle count.

Reported: each variant's drain time and worker-seconds, and autoscale's as ratios of fixed 6's
(the targets: drain time within 15 % of fixed 6, at most 60 % of its worker-seconds).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

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
from bench.projects import write_file
from levers.documents.ledger import Ledger
from levers.documents.submission import Submitter
from levers.observing.reports import live_reports
from levers.pipeline.loading import load_pipeline

SECTION = "## 10. Autoscaling: a burst and a bursty trace against fixed workers"
PIPELINE = "scaled"
PHASE = "work"
JOB_S = 0.2
BURST = 300
TRACE_BURSTS = 3
TRACE_DOCS = 100
GAP_S = 60.0
START_TIMEOUT_S = 120.0
SAMPLE_S = 0.2

HANDLER = f'''"""The autoscaling benchmark's phase: {JOB_S} s of waiting per document."""

import time


def work(doc, ctx):
    time.sleep({JOB_S})
    return {{}}
'''

VARIANTS = {
    "fixed 1": "levers: {workers: 1}",
    "fixed 6": "levers: {workers: 6}",
    "autoscale 1..6": "levers: {workers: 1}\n"
    "    autoscale: {min: 1, max: 6, per_worker: 4, scale_down_after: 10}",
}


@dataclass
class Variant:
    name: str
    drain_s: list[float] = field(default_factory=list)
    worker_s: list[float] = field(default_factory=list)
    trace_s: list[float] = field(default_factory=list)


def main(argv: list[str]) -> int:
    args = bench_parser("autoscale", __doc__, {"--reps": (1, "repetitions of each variant")}).parse_args(argv)
    header = RunHeader.start(["autoscale", *argv])
    with embedded_server() as server:
        variants = [Variant(name) for name in VARIANTS]
        for rep in range(args.reps):
            for variant in variants:
                _one(server, variant)
                sys.stderr.write(
                    f"autoscale: {variant.name} {rep + 1}/{args.reps}: burst drained in "
                    f"{variant.drain_s[-1]:.1f} s, trace {variant.worker_s[-1]:.0f} worker-s\n"
                )
    write_section(args.output, SECTION, render(variants, header.line()))
    return 0


def _one(server: Server, variant: Variant) -> None:
    server.connection.flushall()
    with tempfile.TemporaryDirectory(prefix="levers-bench-autoscale-") as tmp:
        root = Path(tmp)
        write_file(root / "scaled_phase.py", HANDLER)
        text = f"name: {PIPELINE}\nphases:\n  {PHASE}:\n    handler: scaled_phase:work\n    accepts: [.txt]\n"
        write_file(root / "pipeline.yaml", text + f"    {VARIANTS[variant.name]}\n")
        idle = 6 if variant.name == "fixed 6" else 1
        process = _supervise(server, root, idle)
        try:
            submitter = Submitter(load_pipeline(root / "pipeline.yaml"), server.connection)
            variant.drain_s.append(_burst(server, submitter, "burst", BURST))
            _settle(server, idle)
            worker_s, trace_s = _trace(server, submitter, idle)
            variant.worker_s.append(worker_s)
            variant.trace_s.append(trace_s)
        finally:
            stop_process(process)


def _supervise(server: Server, root: Path, idle: int) -> subprocess.Popen[bytes]:
    log = (root / "levers-up.log").open("ab")
    process = subprocess.Popen(
        [PYTHON, "-m", "levers", "up", "-f", str(root / "pipeline.yaml")],
        cwd=root, env=bench_env(REDIS_URL=server.url), stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    log.close()

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"levers up exited with {process.returncode}; see {root / 'levers-up.log'}")
        return _alive(server) == idle

    wait_until(ready, START_TIMEOUT_S, f"{idle} workers", poll_s=0.05)
    return process


def _alive(server: Server) -> int:
    """Worker processes of the phase alive now, as the supervisor last reported (about every second)."""
    return sum(
        len(r.phases[PHASE].pids) for r in live_reports(server.connection, PIPELINE) if PHASE in r.phases
    )


def _done(server: Server) -> int:
    return Ledger(server.connection, PIPELINE).totals(PHASE).get("done", 0)


def _burst(server: Server, submitter: Submitter, tag: str, docs: int) -> float:
    """Submit ``docs`` documents at once; seconds from the first submission to the last done."""
    before = _done(server)
    started = time.monotonic()
    for i in range(docs):
        submitter.submit_bytes(f"{tag} {i} {time.time()}\n".encode(), f"{tag}-{i}.txt")
    wait_until(
        lambda: _done(server) - before >= docs, 60 + 2 * docs * JOB_S, f"{docs} documents", poll_s=0.02
    )
    return time.monotonic() - started


def _settle(server: Server, idle: int) -> None:
    wait_until(lambda: _alive(server) == idle, START_TIMEOUT_S, f"back to {idle} workers", poll_s=0.1)


def _trace(server: Server, submitter: Submitter, idle: int) -> tuple[float, float]:
    """Bursts with idle gaps; worker-seconds and seconds from the first burst until the phase is
    back at its idle count after the last."""
    started = last = time.monotonic()
    worker_s = 0.0
    target = _done(server)
    next_burst, bursts = started, 0
    while True:
        now = time.monotonic()
        if bursts < TRACE_BURSTS and now >= next_burst:
            for i in range(TRACE_DOCS):
                submitter.submit_bytes(
                    f"trace {bursts} {i} {time.time()}\n".encode(), f"trace-{bursts}-{i}.txt"
                )
            target += TRACE_DOCS
            bursts += 1
            next_burst = now + GAP_S
        alive = _alive(server)
        now = time.monotonic()
        worker_s += alive * (now - last)
        last = now
        if bursts == TRACE_BURSTS and _done(server) >= target and alive == idle:
            return worker_s, now - started
        time.sleep(SAMPLE_S)


def render(variants: list[Variant], run_line: str) -> str:
    by_name = {v.name: v for v in variants}
    six, scaled = by_name["fixed 6"], by_name["autoscale 1..6"]
    rows = [
        [v.name, f"{median(v.drain_s):.1f}", f"{median(v.worker_s):.0f}", f"{median(v.trace_s):.1f}"]
        for v in variants
    ]
    drain = median(scaled.drain_s) / median(six.drain_s)
    worker = median(scaled.worker_s) / median(six.worker_s)
    return (
        f"{SECTION}\n\n{run_line}\n\n"
        f"Jobs of {JOB_S * 1000:.0f} ms. Burst: {BURST} documents at once. Trace: {TRACE_BURSTS} bursts of "
        f"{TRACE_DOCS} documents, {GAP_S:g} s apart, until the last is done and the phase is back at its "
        "idle count. Medians over the repetitions.\n\n"
        + md_table(["variant", "burst drain s", "trace worker-s", "trace s"], rows)
        + f"\n\nautoscale 1..6 against fixed 6: drain time **{drain:.2f}x** (target at most 1.15x), "
        f"worker-seconds **{worker:.0%}** (target at most 60 %); fixed 1 drains the burst in "
        f"{median(by_name['fixed 1'].drain_s) / median(six.drain_s):.1f}x fixed 6's time.\n"
    )
