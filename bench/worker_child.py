"""One benchmark worker process: drain a queue in burst mode, print the seconds it took as JSON.

``python -m bench.worker_child VARIANT URL QUEUE [PIPELINE] --out FILE [--profile FILE]
[--count-round-trips]`` (RQ logs to stdout, so the figures go to ``--out``.)

Variants: ``fork`` (rq.Worker), ``simple`` (rq.SimpleWorker), ``levers-bare`` (LeversWorker on plain
RQ jobs) and ``levers`` (levers' own run_worker on a pipeline's queue, running
levers.worker.jobs.run_phase).
All use RQ's JSON serializer, INFO logging (RQ's default and levers') and no scheduler.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.connection import AbstractConnection
from rq import Queue, SimpleWorker, Worker
from rq.job import Job
from rq.serializers import JSONSerializer

import bench.jobs  # noqa: F401  (imported before any fork: a work horse must not import or compile it)
from levers.worker import process as levers_worker
from levers.worker.rq_take import Taken
from levers.worker.rq_worker import LeversWorker


class BareLeversWorker(LeversWorker):
    """LeversWorker's loop on the benchmark's plain RQ jobs (bench.jobs.noop). levers' workers run
    no job but their own, so this subclass, here only, takes any job and runs it as RQ does."""

    job_class = Job

    def _take(self, job: Job, queue: Queue) -> Taken:
        execution = self.prepare_execution(job)
        self.prepare_job_execution(job, remove_from_intermediate_queue=len(self.queues) == 1)
        return Taken(job, queue, execution, None)

    def _perform(self, taken: Taken) -> Any:
        return taken.job.perform()


WORKER_CLASSES: dict[str, type[Any]] = {
    "fork": Worker,
    "simple": SimpleWorker,
    "levers-bare": BareLeversWorker,
}


def count_round_trips() -> list[int]:
    """Count the packets of commands this process sends: one per round trip (a pipeline is one)."""
    counter = [0]
    real_send = AbstractConnection.send_packed_command

    def send_packed_command(self: AbstractConnection, *args: Any, **kwargs: Any) -> None:
        counter[0] += 1
        real_send(self, *args, **kwargs)

    AbstractConnection.send_packed_command = send_packed_command  # type: ignore[method-assign]
    return counter


def _cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (a forking worker's work horses)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass(frozen=True)
class Timing:
    seconds: float  # wall clock
    cpu_s: float  # CPU of the worker (and its work horses)


def timed(work: Callable[[], object], profile: Path | None) -> Timing:
    profiler = cProfile.Profile() if profile else None
    cpu = _cpu_s()
    started = time.perf_counter()
    if profiler is not None:
        profiler.runcall(work)
    else:
        work()
    seconds = time.perf_counter() - started
    cpu = _cpu_s() - cpu
    if profiler is not None and profile is not None:
        profiler.dump_stats(profile)
    return Timing(seconds, cpu)


def run_plain(variant: str, url: str, queue: str, profile: Path | None) -> Timing:
    connection = redis.Redis.from_url(url)
    cls = WORKER_CLASSES[variant]
    worker = cls(
        [Queue(queue, connection=connection, serializer=JSONSerializer)],
        connection=connection,
        serializer=JSONSerializer,
    )
    return timed(lambda: worker.work(burst=True, logging_level="INFO"), profile)


def run_levers(url: str, pipeline: Path, phase: str, profile: Path | None) -> Timing:
    """levers.worker.process.run_worker exactly as a supervisor's worker runs it, but in burst mode.

    Only ``LeversWorker.work`` is wrapped: burst instead of forever, no scheduler process, timed.
    The setup before it (pipeline, connection, runtime, logging) is levers' own and not timed.
    """
    timings: list[Timing] = []
    real_work = levers_worker.LeversWorker.work

    def burst_work(self: levers_worker.LeversWorker, *args: Any, **kwargs: Any) -> bool:
        kwargs.update(burst=True, with_scheduler=False)
        result: list[bool] = []
        timings.append(timed(lambda: result.append(real_work(self, *args, **kwargs)), profile))
        return result[0] if result else False

    levers_worker.LeversWorker.work = burst_work  # type: ignore[method-assign,assignment]
    levers_worker.run_worker(pipeline, phase, url, embedded=False)
    return timings[0]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.worker_child")
    parser.add_argument("variant", choices=[*WORKER_CLASSES, "levers"])
    parser.add_argument("url")
    parser.add_argument("queue", help="the queue (plain variants) or the phase (levers variants)")
    parser.add_argument("pipeline", nargs="?", type=Path)
    parser.add_argument("--out", type=Path, required=True, help="where to write the result as JSON")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--count-round-trips", action="store_true")
    args = parser.parse_args(argv)
    round_trips = count_round_trips() if args.count_round_trips else None
    if args.profile is not None:
        # cProfile sees only the thread it runs on: a LeversWorker does each job's steps there
        levers_worker.LeversWorker.overlap = False
    if args.variant == "levers":
        timing = run_levers(args.url, args.pipeline, args.queue, args.profile)
    else:
        timing = run_plain(args.variant, args.url, args.queue, args.profile)
    result: dict[str, Any] = {"seconds": timing.seconds, "cpu_s": timing.cpu_s}
    if round_trips is not None:
        result["round_trips"] = round_trips[0]
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
