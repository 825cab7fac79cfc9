"""Benchmark 1: per-job overhead on no-op jobs, one worker in burst mode, side by side.

Every run drains the same number of trivial jobs from a fresh database on the same server:
RQ's forking Worker, RQ's SimpleWorker, LeversWorker on the same plain jobs, and levers' own job
path (run_phase on a one-phase pipeline, documents submitted through levers' Submitter). The
variants take turns within each repetition; the figure is the median jobs/s.
"""

from __future__ import annotations

import json
import pstats
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from rq import Queue
from rq.registry import FinishedJobRegistry
from rq.serializers import JSONSerializer

from bench.common import PYTHON, ROOT, Server, bench_env, median
from bench.projects import noop_project
from levers import keys
from levers.documents.submission import Submitter
from levers.pipeline.loading import load_pipeline

PLAIN_QUEUE = "bench-overhead"
PIPELINE = "overhead"  # the name in bench/projects.py's noop_project
PHASE = "noop"
ENQUEUE_BATCH = 500

LABELS = {
    "fork": "rq.Worker (forks per job)",
    "simple": "rq.SimpleWorker",
    "levers-bare": "LeversWorker, plain no-op jobs",
    "levers": "levers job path (run_phase)",
}


SERVER_BOOKKEEPING = frozenset({"config|resetstat", "info"})


@dataclass
class VariantResult:
    rates: list[float] = field(default_factory=list)
    worker_cpu_ms: list[float] = field(default_factory=list)
    server_cpu_ms: list[float] = field(default_factory=list)
    commands_per_job: list[float] = field(default_factory=list)

    @property
    def median_rate(self) -> float:
        return median(self.rates)


@dataclass
class OverheadResult:
    jobs: int
    repetitions: int
    variants: dict[str, VariantResult]
    round_trips: list[dict[str, Any]]
    profile: dict[str, Any] | None = None


def _enqueue_plain(server: Server, jobs: int) -> None:
    queue = Queue(PLAIN_QUEUE, connection=server.connection, serializer=JSONSerializer)
    for start in range(0, jobs, ENQUEUE_BATCH):
        count = min(ENQUEUE_BATCH, jobs - start)
        batch = [Queue.prepare_data("bench.jobs.noop") for _ in range(count)]
        with server.connection.pipeline() as pipe:
            queue.enqueue_many(batch, pipeline=pipe)
            pipe.execute()


def _submit_documents(server: Server, root: Path, jobs: int, tag: str) -> Path:
    pipeline = noop_project(root)
    submitter = Submitter(load_pipeline(pipeline), server.connection)
    for i in range(jobs):
        submitter.submit_bytes(f"{tag} document {i}\n".encode(), f"doc{i}.txt")
    return pipeline


def _finished(server: Server, variant: str) -> int:
    """Jobs RQ recorded as finished; for the levers path, documents the ledger has done (levers
    keeps no finished job: its document's record says it all)."""
    if _is_levers_path(variant):
        return int(server.connection.zcard(keys.finished(PIPELINE)))
    queue = Queue(PLAIN_QUEUE, connection=server.connection, serializer=JSONSerializer)
    return FinishedJobRegistry(queue=queue).count


def _command_counts(server: Server) -> Counter[str]:
    stats = server.connection.info("commandstats")
    counts: Counter[str] = Counter()
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command not in SERVER_BOOKKEEPING:
            counts[command] = int(values["calls"])
    return counts


@dataclass(frozen=True)
class RunResult:
    rate: float  # jobs/s
    worker_cpu_ms: float  # CPU of the worker process (and work horses) per job
    server_cpu_ms: float  # CPU of the server per job
    commands: Counter[str]  # commands the server executed, by name
    round_trips: int | None  # packets the worker process sent (with count=True)


def run_one(
    server: Server, variant: str, jobs: int, workdir: Path, tag: str, profile: Path | None = None,
    count: bool = False,
) -> RunResult:  # fmt: skip
    """Prepare ``jobs`` jobs for ``variant`` and drain them with one worker in burst mode."""
    server.connection.flushdb()
    if _is_levers_path(variant):
        pipeline: Path | None = _submit_documents(server, workdir / tag, jobs, tag)
        target = PHASE
    else:
        _enqueue_plain(server, jobs)
        pipeline, target = None, PLAIN_QUEUE
    server.connection.config_resetstat()
    out = workdir / f"{tag}.json"
    args = [PYTHON, "-m", "bench.worker_child", variant, server.url, target]
    if pipeline is not None:
        args.append(str(pipeline))
    args += ["--out", str(out)]
    if profile is not None:
        args += ["--profile", str(profile)]
    if count:
        args.append("--count-round-trips")
    env = bench_env()
    server_cpu = _cpu_s(server.pid)
    with (workdir / f"{tag}.log").open("wb") as log:
        done = subprocess.run(
            args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=900, check=False
        )
    # the server's CPU over the whole child run (start-up included: a few commands, negligible)
    server_cpu = _cpu_s(server.pid) - server_cpu
    log_tail = (workdir / f"{tag}.log").read_text(errors="replace")[-3000:]
    if done.returncode != 0:
        raise RuntimeError(f"{variant} worker exited with {done.returncode}:\n{log_tail}")
    commands = _command_counts(server)
    finished = _finished(server, variant)
    if finished != jobs:
        raise RuntimeError(f"{variant}: {finished} of {jobs} jobs finished:\n{log_tail}")
    result = json.loads(out.read_text())
    return RunResult(
        rate=jobs / float(result["seconds"]),
        worker_cpu_ms=float(result["cpu_s"]) * 1000 / jobs,
        server_cpu_ms=server_cpu * 1000 / jobs,
        commands=commands,
        round_trips=result.get("round_trips"),
    )


def _cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _is_levers_path(variant: str) -> bool:
    return variant == "levers"


def run(
    server: Server, jobs: int, repetitions: int, variants: Sequence[str], profile_jobs: int = 0,
    progress: Any = print,
) -> OverheadResult:  # fmt: skip
    results = {v: VariantResult() for v in variants}
    with tempfile.TemporaryDirectory(prefix="levers-bench-overhead-") as tmp:
        workdir = Path(tmp)
        for rep in range(repetitions):
            # rotate the order so no variant always runs first (or last) on a noisy machine
            order = [*variants[rep % len(variants) :], *variants[: rep % len(variants)]]
            for variant in order:
                one = run_one(server, variant, jobs, workdir, f"{variant}-{rep}")
                result = results[variant]
                result.rates.append(one.rate)
                result.worker_cpu_ms.append(one.worker_cpu_ms)
                result.server_cpu_ms.append(one.server_cpu_ms)
                result.commands_per_job.append(sum(one.commands.values()) / jobs)
                progress(
                    f"  overhead {rep + 1}/{repetitions} {LABELS[variant]:<34} {one.rate:5.0f} jobs/s, "
                    f"CPU/job {one.worker_cpu_ms:.2f} ms worker + {one.server_cpu_ms:.2f} ms server"
                )
        trips = round_trips(server, workdir)
        profile = profile_levers(server, profile_jobs, workdir) if profile_jobs else None
    return OverheadResult(jobs, repetitions, results, trips, profile)


# --- round trips and commands per job, deterministic ----------------------------------------------


# The variants of the round-trip table.
TRIP_VARIANTS = ("simple", "levers-bare", "levers")


def round_trips(server: Server, workdir: Path, small: int = 20, large: int = 120) -> list[dict[str, Any]]:
    """Round trips and commands per job: the difference between a small and a large run, so the
    worker's start and end do not count. Exact, whatever the machine's noise."""
    rows = []
    for variant in TRIP_VARIANTS:
        runs = [
            run_one(server, variant, n, workdir, f"trips-{variant}-{n}", count=True) for n in (small, large)
        ]
        trips = [r.round_trips or 0 for r in runs]
        commands = [sum(r.commands.values()) for r in runs]
        mix = runs[1].commands - runs[0].commands
        rows.append(
            {
                "label": LABELS[variant],
                "round_trips": (trips[1] - trips[0]) / (large - small),
                "commands": (commands[1] - commands[0]) / (large - small),
                "mix": {c: n / (large - small) for c, n in mix.most_common()},
            }
        )
    return rows


# --- profile of the levers job path -----------------------------------------------------------

# Functions whose cumulative time per job is reported, as (file suffix, function name).
BREAKDOWN: list[tuple[str, str, str]] = [
    ("rq/worker/base.py", "work", "worker loop (whole run)"),
    ("levers/worker/rq_reconnect.py", "wait_for_job", "  dequeue (BLMOVE, fetch job)"),
    ("levers/worker/rq_take.py", "_take", "  take: register the job as this worker's"),
    ("rq/worker/base.py", "prepare_execution", "    RQ: prepare execution (started registry, status)"),
    (
        "levers/worker/rq_take.py",
        "_register",
        "    prepare job execution (job status, heartbeat, holding list)",
    ),
    ("levers/worker/jobs.py", "start_phase", "    levers.worker.jobs.start_phase (Ledger.start script)"),
    ("levers/worker/rq_worker.py", "_run", "  run: the handler step"),
    ("levers/worker/jobs.py", "perform_phase", "    levers.worker.jobs.perform_phase"),
    ("levers/pipeline/watching.py", "current", "      PipelineWatcher.current (stat pipeline.yaml)"),
    ("levers/worker/jobs.py", "_call_handler", "      _call_handler (context, doc, handler, json check)"),
    ("levers/worker/jobs.py", "_document", "        _document (prior-output lookup)"),
    ("levers/worker/rq_worker.py", "_settle", "  settle: output, hand-off, RQ's result"),
    ("levers/worker/jobs.py", "complete_phase", "    levers.worker.jobs.complete_phase"),
    ("levers/documents/store.py", "put_output", "      LocalStore.put_output (mkstemp, write, rename)"),
    ("levers/worker/jobs.py", "_hand_off", "      _hand_off (ledger finished, transaction)"),
    ("rq/worker/base.py", "handle_job_success", "    RQ: handle_job_success (result, registries)"),
    ("rq/worker/base.py", "heartbeat", "  RQ: heartbeat"),
    ("logging/__init__.py", "callHandlers", "  logging: formatting and writing log lines"),
    ("redis/connection.py", "send_packed_command", "  (redis) sending commands: one per round trip"),
    ("redis/connection.py", "read_response", "  (redis) reading replies"),
]


def _match(stats: dict[Any, Any], suffix: str, name: str) -> list[Any]:
    return [key for key in stats if key[0].endswith(suffix) and key[2] == name]


def _cumulative(stats: dict[Any, Any], suffix: str, name: str) -> tuple[float, int]:
    """(cumulative seconds, calls) of the matching functions, without double-counting recursion."""
    seconds, calls = 0.0, 0
    for key in _match(stats, suffix, name):
        _cc, nc, _tt, ct, _callers = stats[key]
        seconds += ct
        calls += nc
    return seconds, calls


def analyse_profile(path: Path, jobs: int) -> dict[str, Any]:
    """Per-job cumulative ms of the breakdown functions, and the top functions by own time."""
    stats_obj = pstats.Stats(str(path))
    stats: dict[Any, Any] = stats_obj.stats  # type: ignore[attr-defined]
    breakdown = []
    for suffix, name, label in BREAKDOWN:
        seconds, calls = _cumulative(stats, suffix, name)
        if calls:
            per_job = {"ms_per_job": seconds * 1000 / jobs, "calls_per_job": calls / jobs}
            breakdown.append({"label": label, **per_job})
    top = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:15]
    own = [
        {
            "function": f"{_short(key[0])}:{key[1]}({key[2]})",
            "own_ms_per_job": values[2] * 1000 / jobs,
            "calls_per_job": values[1] / jobs,
        }
        for key, values in top
    ]
    return {"breakdown": breakdown, "own_time": own}


def _short(filename: str) -> str:
    for marker in ("site-packages/", "src/", "lib/python3"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def profile_levers(server: Server, jobs: int, workdir: Path) -> dict[str, Any]:
    """Run the bare LeversWorker and the levers job path once each under cProfile."""
    out: dict[str, Any] = {"jobs": jobs}
    for variant in ("levers-bare", "levers"):
        path = workdir / f"{variant}.prof"
        one = run_one(server, variant, jobs, workdir, f"profile-{variant}", profile=path)
        out[variant] = {"rate_under_profiler": one.rate, **analyse_profile(path, jobs)}
        keep = ROOT / "bench" / "profiles"
        keep.mkdir(exist_ok=True)
        (keep / f"{variant}.prof").write_bytes(path.read_bytes())
    return out
