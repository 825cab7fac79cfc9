"""Benchmark 2: lever efficiency, documents/second against the ideal, through the real supervisor.

The phase makes CALLS simulated calls of CALL_S seconds each (``asyncio.sleep``) through
``ctx.gather``, so with semaphore s one document takes ceil(CALLS / s) x CALL_S at best, and w
workers finish at most w / (ceil(CALLS / s) x CALL_S) documents per second: the ideal.

For each worker count the real ``levers up`` supervises the workers; the benchmark waits until
every worker is registered with RQ, then, for each semaphore value, rewrites pipeline.yaml (the
running workers read the semaphore lever at the start of every job) and submits the cell's
documents through levers' Submitter. A cell's rate is its documents over the time from its first
job start to its last document finished, both from levers' ledger: worker start-up is outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rq import Queue, Worker
from rq.job import Job
from rq.registry import FailedJobRegistry, FinishedJobRegistry
from rq.serializers import JSONSerializer

from bench.common import PYTHON, ROOT, Server, bench_env, median, stop_process, wait_until
from bench.projects import calls_pipeline, calls_project
from levers import keys
from levers.documents import routing
from levers.documents.ledger import Ledger
from levers.documents.submission import Submitter
from levers.pipeline.loading import load_pipeline

CALLS = 20
CALL_S = 0.02
PIPELINE = "efficiency"  # the name in bench/projects.py's calls_pipeline
PHASE = "calls"
START_TIMEOUT_S = 60.0


def ideal_rate(workers: int, semaphore: int) -> float:
    return workers / (math.ceil(CALLS / semaphore) * CALL_S)


@dataclass
class Cell:
    workers: int
    semaphore: int
    docs: int
    rates: list[float] = field(default_factory=list)  # steady: the sum of each worker's own rate
    batch_rates: list[float] = field(default_factory=list)  # documents / (last finish - first start)
    submit_s: list[float] = field(default_factory=list)  # time the submitter took, for context
    window_s: list[float] = field(default_factory=list)
    handler_s: list[float] = field(default_factory=list)  # mean time of the handler inside the worker
    worker_cpu_ms: list[float] = field(default_factory=list)  # CPU of the workers per document
    busy: list[float] = field(default_factory=list)  # share of the machine's CPU busy (all processes)

    @property
    def ideal(self) -> float:
        return ideal_rate(self.workers, self.semaphore)

    @property
    def measured(self) -> float:
        return median(self.rates)

    @property
    def efficiency(self) -> float:
        return self.measured / self.ideal

    @property
    def batch_efficiency(self) -> float:
        return median(self.batch_rates) / self.ideal

    @property
    def per_doc_s(self) -> float:
        """Seconds of one worker per document, measured (workers / rate)."""
        return self.workers / self.measured

    @property
    def in_worker(self) -> float:
        """Seconds of the handler inside the worker (the ledger's phase seconds; RQ's job span)."""
        return median(self.handler_s)


@dataclass
class EfficiencyResult:
    cells: list[Cell]
    repetitions: int
    window_s: float
    handler_s: dict[int, float]  # semaphore -> seconds per document of the handler alone
    rq_cells: list[Cell] = field(default_factory=list)  # the same workload as plain RQ jobs
    # microseconds of levers' steps around a handler: back to back, and right after a wait
    steps_us: tuple[float, float] | None = None


def docs_for(workers: int, semaphore: int, window_s: float, min_docs: int, max_docs: int) -> int:
    """Enough documents for about ``window_s`` of work at the ideal rate, within the bounds."""
    wanted = round(ideal_rate(workers, semaphore) * window_s)
    # a whole number of rounds per worker, so an idle tail does not cut into the figure
    wanted = max(min_docs, min(max_docs, wanted))
    return math.ceil(wanted / workers) * workers


def _queue(server: Server) -> Queue:
    return Queue(keys.queue_name(PIPELINE, PHASE), connection=server.connection, serializer=JSONSerializer)


class _Counts:
    def __init__(self, server: Server) -> None:
        self.finished = FinishedJobRegistry(queue=_queue(server))
        self.failed = FailedJobRegistry(queue=_queue(server))

    def done(self) -> int:
        return self.finished.count + self.failed.count


def _workers_cpu_s(supervisor: int) -> float:
    """CPU seconds of the supervisor's descendants (the workers and their schedulers)."""
    total = 0.0
    for process in psutil.Process(supervisor).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


def _machine_busy(before: Any, after: Any) -> float:
    idle = (after.idle + after.iowait) - (before.idle + before.iowait)
    total = sum(after) - sum(before)
    return 1 - idle / total if total > 0 else 0.0


def _run_cell(server: Server, root: Path, cell: Cell, tag: str, supervisor: int) -> None:
    counts = _Counts(server)
    before = counts.done()
    failed_before = counts.failed.count
    submitter = Submitter(load_pipeline(root / "pipeline.yaml"), server.connection)
    # each worker's rate comes from its finished jobs' times, which levers' jobs do not keep
    routing.RESULT_TTL_S = 3600
    cpu_before, machine_before = _workers_cpu_s(supervisor), psutil.cpu_times()
    started = time.perf_counter()
    outcomes = [submitter.submit_bytes(f"{tag} {i}\n".encode(), f"{tag}-{i}.txt") for i in range(cell.docs)]
    cell.submit_s.append(time.perf_counter() - started)
    timeout = 60 + 5 * cell.docs / cell.ideal
    wait_until(lambda: counts.done() - before >= cell.docs, timeout, f"{cell.docs} documents", poll_s=0.05)
    cell.worker_cpu_ms.append((_workers_cpu_s(supervisor) - cpu_before) * 1000 / cell.docs)
    cell.busy.append(_machine_busy(machine_before, psutil.cpu_times()))
    if counts.failed.count != failed_before:
        raise RuntimeError(f"documents failed in cell w={cell.workers} s={cell.semaphore}; see {root}")
    records = Ledger(server.connection, PIPELINE).get_many([o.doc_id for o in outcomes if o.doc_id])
    starts = [r.phases[PHASE].started for r in records if r is not None and PHASE in r.phases]
    ends = [r.finished for r in records if r is not None and r.finished is not None]
    if len(starts) != cell.docs or len(ends) != cell.docs:
        raise RuntimeError(f"the ledger lacks times for some documents of {tag}")
    window = max(ends) - min(s for s in starts if s is not None)
    handler = [s for r in records if r is not None and (s := r.phases[PHASE].seconds) is not None]
    cell.handler_s.append(sum(handler) / len(handler))
    cell.window_s.append(window)
    cell.batch_rates.append(cell.docs / window)
    cells_docs = {o.doc_id for o in outcomes}
    finished = Job.fetch_many(counts.finished.get_job_ids(), server.connection, JSONSerializer)
    cell.rates.append(steady_rate([j for j in finished if j is not None and j.args[1] in cells_docs]))


def steady_rate(jobs: Sequence[Job]) -> float:
    """Documents per second as the sum of each worker's own rate: its jobs over the span from its
    first job's start to its last job's end (RQ's times).

    A cell's documents reach the workers one by one as the submitter makes them, so the workers
    start a few milliseconds apart and, each doing its share, end as far apart; over the whole
    batch that stagger counts as if every worker had idled through it. Each worker's own span
    still holds all that happens between its jobs.
    """
    spans: dict[str, list[tuple[float, float]]] = {}
    for job in jobs:
        if job.started_at is None or job.ended_at is None:
            raise RuntimeError(f"RQ lacks the times of job {job.id}")
        span = (job.started_at.timestamp(), job.ended_at.timestamp())
        spans.setdefault(str(job.worker_name), []).append(span)
    return sum(len(times) / (max(e for _, e in times) - min(s for s, _ in times)) for times in spans.values())


def _supervise(server: Server, root: Path, workers: int) -> subprocess.Popen[bytes]:
    """Start the real `levers up` and wait until its workers listen."""
    log = (root / "levers-up.log").open("ab")
    process = subprocess.Popen(
        [PYTHON, "-m", "levers", "up", "-f", str(root / "pipeline.yaml")],
        cwd=root,
        env=bench_env(REDIS_URL=server.url),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    queue = _queue(server)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"levers up exited with {process.returncode}; see {root / 'levers-up.log'}")
        listening = Worker.all(queue=queue)
        return len(listening) == workers and all(w.get_state() == "idle" for w in listening)

    wait_until(ready, START_TIMEOUT_S, f"{workers} workers to listen", poll_s=0.05)
    return process


RQ_QUEUE = "bench-calls"


def _rq_workers(server: Server, root: Path, workers: int) -> list[subprocess.Popen[bytes]]:
    """Start ``workers`` plain `rq worker -w rq.SimpleWorker` processes and wait until they listen."""
    rq_cli = str(Path(PYTHON).with_name("rq"))
    command = [rq_cli, "worker", "-w", "rq.SimpleWorker", "-S", "json", "-u", server.url, RQ_QUEUE]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "rq-workers.log").open("ab") as log:
        processes = [
            subprocess.Popen(command, cwd=ROOT, env=bench_env(), stdout=log, stderr=subprocess.STDOUT)
            for _ in range(workers)
        ]
    queue = Queue(RQ_QUEUE, connection=server.connection, serializer=JSONSerializer)

    def ready() -> bool:
        if any(p.poll() is not None for p in processes):
            raise RuntimeError(f"an rq worker exited; see {root / 'rq-workers.log'}")
        listening = Worker.all(queue=queue)
        return len(listening) == workers and all(w.get_state() == "idle" for w in listening)

    wait_until(ready, START_TIMEOUT_S, f"{workers} rq workers to listen", poll_s=0.05)
    return processes


def _processes_cpu_s(processes: Sequence[subprocess.Popen[bytes]]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(process.pid).cpu_times()
            total += times.user + times.system
    return total


def _run_rq_cell(server: Server, cell: Cell, processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """The cell's documents as plain RQ jobs (bench.jobs.calls), enqueued at once in one pipeline."""
    queue = Queue(RQ_QUEUE, connection=server.connection, serializer=JSONSerializer)
    finished = FinishedJobRegistry(queue=queue)
    before = finished.count
    cpu_before, machine_before = _processes_cpu_s(processes), psutil.cpu_times()
    with server.connection.pipeline() as pipe:
        jobs = queue.enqueue_many(
            [
                Queue.prepare_data("bench.jobs.calls", args=(cell.semaphore, CALLS, CALL_S))
                for _ in range(cell.docs)
            ],
            pipeline=pipe,
        )
        pipe.execute()
    timeout = 60 + 5 * cell.docs / cell.ideal
    wait_until(lambda: finished.count - before >= cell.docs, timeout, f"{cell.docs} rq jobs", poll_s=0.05)
    cell.worker_cpu_ms.append((_processes_cpu_s(processes) - cpu_before) * 1000 / cell.docs)
    cell.busy.append(_machine_busy(machine_before, psutil.cpu_times()))
    fetched = [j for j in Job.fetch_many([j.id for j in jobs], server.connection, JSONSerializer) if j]
    spans = [(j.started_at, j.ended_at) for j in fetched if j.started_at and j.ended_at]
    if len(spans) != cell.docs:
        raise RuntimeError("RQ lacks times for some jobs")
    window = (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds()
    cell.window_s.append(window)
    cell.batch_rates.append(cell.docs / window)
    cell.rates.append(steady_rate(fetched))
    cell.handler_s.append(sum((e - s).total_seconds() for s, e in spans) / len(spans))


def _describe(cell: Cell, label: str) -> str:
    rate = cell.rates[-1]
    text = (
        f"workers={cell.workers} semaphore={cell.semaphore:<2}{label} {cell.docs:4d} docs {rate:7.1f} docs/s "
    )
    text += (
        f"({rate / cell.ideal:6.1%} of {cell.ideal:.1f}), workers' CPU {cell.worker_cpu_ms[-1]:.1f} ms/doc, "
    )
    return text + f"machine {cell.busy[-1]:.0%} busy"


def _levers_run(
    server: Server, root: Path, cells: dict[tuple[int, int], Cell], w: int, semaphores: Sequence[int],
    rep: int, progress: Callable[[str], object],
) -> None:  # fmt: skip
    """One supervisor with ``w`` workers, through every semaphore value."""
    server.connection.flushdb()
    calls_project(root, w, semaphores[0], CALLS, CALL_S)
    process = _supervise(server, root, w)
    try:
        for s in semaphores:
            calls_pipeline(root, w, s)  # the running workers take it at their next job
            cell = cells[(w, s)]
            _run_cell(server, root, cell, f"r{rep}w{w}s{s}", process.pid)
            progress(f"  efficiency {rep + 1}: {_describe(cell, '')}")
    finally:
        stop_process(process)


def _rq_run(
    server: Server, root: Path, cells: dict[tuple[int, int], Cell], w: int, semaphores: Sequence[int],
    rep: int, progress: Callable[[str], object],
) -> None:  # fmt: skip
    """``w`` plain RQ SimpleWorkers, through every semaphore value."""
    server.connection.flushdb()
    processes = _rq_workers(server, root, w)
    try:
        for s in semaphores:
            cell = cells[(w, s)]
            _run_rq_cell(server, cell, processes)
            progress(f"  efficiency {rep + 1}: {_describe(cell, ' rq.SimpleWorker')}")
    finally:
        for process in processes:
            stop_process(process)


def run(
    server: Server, workers: Sequence[int], semaphores: Sequence[int], repetitions: int, window_s: float,
    min_docs: int, max_docs: int, rq_workers: Sequence[int] = (), progress: Callable[[str], object] = print,
) -> EfficiencyResult:  # fmt: skip
    """The grid workers x semaphores under `levers up`, and ``rq_workers`` x semaphores with plain RQ
    SimpleWorkers running the same workload."""

    def cell(w: int, s: int) -> Cell:
        return Cell(w, s, docs_for(w, s, window_s, min_docs, max_docs))

    cells = {(w, s): cell(w, s) for w in workers for s in semaphores}
    rq_cells = {(w, s): cell(w, s) for w in rq_workers for s in semaphores}
    with tempfile.TemporaryDirectory(prefix="levers-bench-efficiency-") as tmp:
        for rep in range(repetitions):
            for w in workers:
                _levers_run(server, Path(tmp) / f"rep{rep}-w{w}", cells, w, semaphores, rep, progress)
            for w in rq_workers:
                _rq_run(server, Path(tmp) / f"rep{rep}-rq{w}", rq_cells, w, semaphores, rep, progress)
    return EfficiencyResult(
        list(cells.values()), repetitions, window_s, handler_alone(semaphores), list(rq_cells.values()),
        steps_around_a_handler(server),
    )  # fmt: skip


def handler_alone(semaphores: Sequence[int], runs: int = 9) -> dict[int, float]:
    """Seconds one document takes with no worker at all: the handler on one event loop, in this
    process, one document after another.

    The ceiling for any worker: asyncio.sleep overshoots by a little each round (the loop waits
    in whole milliseconds), so even this stays under the ideal.
    """
    from levers.worker.phase_context import Levers, PhaseContext

    async def calls(ctx: PhaseContext) -> None:
        await ctx.gather(*(asyncio.sleep(CALL_S) for _ in range(CALLS)))

    seconds = {}
    loop = asyncio.new_event_loop()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for s in semaphores:
                times = []
                for _ in range(runs):
                    ctx = PhaseContext(PHASE, Levers(1, s, 0), {}, Path(tmp), None)
                    started = time.perf_counter()
                    loop.run_until_complete(calls(ctx))
                    times.append(time.perf_counter() - started)
                seconds[s] = median(times)
    finally:
        loop.close()
    return seconds


def steps_around_a_handler(server: Server, runs: int = 300) -> tuple[float, float]:
    """Median microseconds of levers' own steps around an async handler that returns at once (the
    job timeout, the look at the pipeline file, the context, the event loop's entry and exit), run back
    to back and run right after a wait as long as one simulated call.

    The second is what the steps cost between two handlers of this benchmark: after a wait the
    caches are cold and the same code runs several times slower.
    """
    from rq.timeouts import JobTimeoutException

    from levers.documents.ledger import DocStatus, DocumentRecord
    from levers.pipeline.watching import PipelineWatcher
    from levers.worker.jobs import StartedPhase, perform_phase
    from levers.worker.phase_context import Document
    from levers.worker.rq_timeout import JobTimeout
    from levers.worker.runtime import WorkerRuntime

    with tempfile.TemporaryDirectory(prefix="levers-bench-steps-") as tmp:
        pipeline = calls_project(Path(tmp), 1, 1, 0, CALL_S)  # no calls: the handler returns at once
        runtime = WorkerRuntime(PipelineWatcher.open(pipeline), server.connection, server.url)
        record = DocumentRecord("steps", "steps.txt", "bytes", DocStatus.RUNNING, PHASE, 0.0, None, None)
        phase_started = StartedPhase(PHASE, record, Document("steps", "steps.txt", b""))

        def steps_us(wait_s: float) -> float:
            times = []
            for _ in range(runs):
                if wait_s:
                    time.sleep(wait_s)
                started = time.perf_counter()
                with JobTimeout(60, JobTimeoutException, job_id="steps"):
                    perform_phase(runtime, phase_started)
                times.append((time.perf_counter() - started) * 1e6)
            return median(times)

        steps_us(0)  # imports and first-use costs
        return steps_us(0), steps_us(CALL_S)
