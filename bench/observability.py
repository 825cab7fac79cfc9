"""What watching the pipeline costs: `levers status` against a deep queue, and a job's metrics.

1. ``pipeline_status`` (what `levers status` computes) with 100,000 jobs queued, against the same
   pipeline with 100 queued: it must not scan jobs, so the ratio should stay near 1. The whole
   `levers status --json` command is timed too; most of that is the interpreter's start-up.
2. The cost of recording a job's metrics: the job's hand-off transaction as `levers.worker.jobs` sends
   it, with and without the commands of ``metrics.record``, taking turns on one server.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from rq import Queue
from rq.serializers import JSONSerializer

from bench.common import Server, md_table, verdict
from levers import keys, metrics
from levers.observing.status import pipeline_status
from levers.pipeline.loading import load_pipeline
from levers.pipeline.outline import outline_of

PIPELINE = """
name: watched
phases:
  first:
    handler: json:loads
    accepts: ["*"]
    next: second
    levers: {workers: 3}
  second:
    handler: json:loads
    levers: {workers: 2}
"""
DEEP = 100_000
SHALLOW = 100
ENQUEUE_BATCH = 5_000


@dataclass(frozen=True)
class StatusCost:
    queued: int
    query_ms: float  # median of in-process pipeline_status calls
    command_ms: float  # median wall time of `levers status --json`


@dataclass(frozen=True)
class ObservabilityResult:
    shallow: StatusCost
    deep: StatusCost
    handoff_ms: float  # median hand-off transaction without metrics
    handoff_with_metrics_ms: float

    @property
    def metrics_ms(self) -> float:
        return self.handoff_with_metrics_ms - self.handoff_ms


def run(server: Server, repetitions: int) -> ObservabilityResult:
    with tempfile.TemporaryDirectory(prefix="levers-bench-status-") as tmp:
        path = Path(tmp) / "pipeline.yaml"
        path.write_text(PIPELINE)
        server.connection.flushall()
        shallow = _status_cost(server, path, SHALLOW, repetitions)
        server.connection.flushall()
        deep = _status_cost(server, path, DEEP, repetitions)
    server.connection.flushall()
    plain, recorded = _handoff_costs(server.connection, repetitions * 200)
    return ObservabilityResult(shallow, deep, plain, recorded)


def _status_cost(server: Server, path: Path, jobs: int, repetitions: int) -> StatusCost:
    spec = load_pipeline(path).spec
    queue = Queue(
        keys.queue_name(spec.name, "first"), connection=server.connection, serializer=JSONSerializer
    )
    for start in range(0, jobs, ENQUEUE_BATCH):
        batch = [
            Queue.prepare_data("levers.worker.jobs.run_phase", args=("first", f"doc{i}"))
            for i in range(start, min(start + ENQUEUE_BATCH, jobs))
        ]
        queue.enqueue_many(batch)
    assert queue.count == jobs
    queries = []
    for _ in range(repetitions * 5):
        started = time.perf_counter()
        pipeline_status(server.connection, outline_of(spec))
        queries.append((time.perf_counter() - started) * 1000)
    commands = []
    for _ in range(repetitions):
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "levers", "status", "--json", "-f", str(path)],
            env={"REDIS_URL": server.url, "PATH": ""}, capture_output=True, text=True, check=True,
        )  # fmt: skip
        commands.append((time.perf_counter() - started) * 1000)
        assert json.loads(result.stdout)["phases"][0]["queued"] == jobs
    return StatusCost(jobs, statistics.median(queries), statistics.median(commands))


def _handoff_costs(connection: redis.Redis, rounds: int) -> tuple[float, float]:
    """Median ms of the hand-off transaction without and with metrics, alternating."""
    plain, recorded = [], []
    for i in range(rounds):
        for with_metrics, sink in ((False, plain), (True, recorded)):
            started = time.perf_counter()
            with connection.pipeline() as pipe:
                # what Ledger.finished queues on the hand-off transaction, without then with its metrics
                pipe.hset(f"levers:watched:doc:d{i}", mapping={"first:seconds": 0.01, "status": "queued"})
                pipe.hdel(f"levers:watched:doc:d{i}", "first:error")
                pipe.hincrby(keys.phase_counter("watched", "first"), "done", 1)
                if with_metrics:
                    metrics.record(pipe, "watched", "first", "done", 0.01, calls=20)
                pipe.execute()
            sink.append((time.perf_counter() - started) * 1000)
    return statistics.median(plain), statistics.median(recorded)


def render(result: ObservabilityResult) -> str:
    rows = [
        [f"{cost.queued:,}", f"{cost.query_ms:.1f}", f"{cost.command_ms:.0f}"]
        for cost in (result.shallow, result.deep)
    ]
    table = md_table(
        ["jobs queued", "status query, ms (median)", "`levers status --json`, ms (median)"], rows
    )
    ratio = result.deep.query_ms / result.shallow.query_ms
    return f"""## 4. Watching the pipeline: status with a deep queue, metrics per job

`pipeline_status` is what `levers status` computes (queue lengths, registries, workers, the
per-minute metric buckets of every phase, the head job's age): with 100,000 jobs queued it must
cost what it costs with 100, since it never scans jobs. The command's time is a fresh
`python -m levers status --json`, most of it the interpreter starting and importing.

{table}

Query time, 100,000 against 100 queued: **{ratio:.2f}×**. Target: under 300 ms with 100,000
queued: the query takes {result.deep.query_ms:.1f} ms (**{verdict(result.deep.query_ms < 300)}**); the
whole command {result.deep.command_ms:.0f} ms, most of it the interpreter importing levers, rq, redis,
pydantic and rich, whatever the queue holds.

Recording a job's metrics adds its commands to the hand-off transaction the job sends anyway: the
transaction takes {result.handoff_ms:.3f} ms without them and {result.handoff_with_metrics_ms:.3f} ms
with them (median, alternating), so recording adds **{result.metrics_ms * 1000:.0f} µs** per job
(target ≤ 1 ms: **{verdict(result.metrics_ms <= 1)}**).
"""
