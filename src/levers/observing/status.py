"""Where the pipeline stands, per phase, read from Redis without scanning jobs.

Every figure comes from a counter, a list length or a registry, so the answer costs the same with
ten jobs queued or a hundred thousand. Workers count only while alive: levers' own while a live
supervisor vouches for them, others while heard from lately. A job registered to a worker that is
not alive is stranded, not running, until a supervisor puts it back on its queue.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import redis
from rq import Queue, Worker
from rq.exceptions import DeserializationError
from rq.executions import Execution
from rq.job import Job
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import BaseWorker

from levers import keys, metrics
from levers.documents.ledger import Ledger
from levers.limits.status import learned_concurrency, limits_status, workers_for
from levers.observing.reports import (
    PhaseReport,
    SupervisorLease,
    SupervisorReport,
    live_reports,
    supervisor_leases,
)
from levers.observing.versions import VersionStatus, version_status
from levers.pipeline.loading import LoadedPipeline
from levers.pipeline.outline import PipelineOutline

# Queue depths past these call for more workers, then for them at once (the seed's thresholds).
QUEUE_WARNING = 100
QUEUE_EMERGENCY = 1000
# Past this share of failed jobs, look at the errors: it is not a scaling problem.
FAILED_SHARE_WARNING = 0.10
# Below this utilization no phase is holding documents up.
BUSY_ENOUGH = 0.05
# Throughput and job times are over this many recent minutes.
METRICS_MINUTES = 5
# Utilization is over the current minute and the one before: recent enough to agree with the
# workers busy now, long enough not to swing with each job.
UTILIZATION_MINUTES = 2
# A worker levers did not start is alive while its last heartbeat is this recent (an idle RQ
# worker beats at least every worker_ttl - 15 s, a busy forking one every 30 s).
HEARTBEAT_FRESH_S = keys.WORKER_TTL_S


@dataclass(frozen=True)
class AutoscaleStatus:
    """An autoscaled phase: its bounds, and why its supervisors want the workers they want."""

    min: int
    max: int
    per_worker: int
    scale_down_after: float
    # over all hosts: ceil((queued + running) / per_worker), capped by the shared limits it calls
    # (at the concurrency they learned)
    needed: int
    reason: str  # the demand, then every cap that bites (limit, memory, window), per host when several


@dataclass(frozen=True)
class PhaseStatus:
    phase: str
    queued: int
    running: int  # jobs alive workers run now: at most one each
    claimed_ahead: int  # jobs alive workers took while finishing the one before, not yet started
    stranded: int  # jobs held by workers that are gone, until a supervisor requeues them
    waiting_retry: int
    done: int
    failed: int  # failed documents kept (failed_ttl), as `levers failed` lists them
    failed_attempts: int  # attempts that failed for good, ever: a counter, never lowered by a purge
    retried: int
    workers_desired: int
    workers_alive: int
    workers_busy: int
    state: str
    workers: int
    semaphore: int
    threads: int
    oldest_wait_s: float | None
    throughput: float  # documents finished per second over the last METRICS_MINUTES (or since a run began)
    utilization: (
        float  # busy share of the alive workers' time over UTILIZATION_MINUTES, jobs running included
    )
    p50_s: float | None
    p95_s: float | None
    calls_per_job: float
    cpu_percent: float | None  # mean over the phase's workers, % of one core
    rss_mb: float | None  # mean resident memory of the phase's workers
    bottleneck: bool = False
    fixed: tuple[str, ...] = ()  # levers the phase declares fixed: advice leaves them alone
    autoscale: AutoscaleStatus | None = None  # for a phase with autoscale: (workers_desired: its count)
    lanes: dict[str, int] = field(default_factory=dict)  # queued per priority lane (``queued``: their sum)
    reused: int = 0  # jobs that took a stored result (levers.worker.reuse), ever; not in ``done``

    @property
    def drain_s(self) -> float | None:
        """Seconds to clear the queue at the current pace (None without a measured pace)."""
        if not self.queued:
            return 0.0
        if not self.p50_s or not self.workers_alive:
            return None
        return self.queued * self.p50_s / self.workers_alive

    @property
    def failed_share(self) -> float:
        finished = self.done + self.failed
        return self.failed / finished if finished else 0.0

    @property
    def alerts(self) -> list[str]:
        found = []
        if self.queued > QUEUE_EMERGENCY:
            found.append(f"queue over {QUEUE_EMERGENCY}: add workers now")
        elif self.queued > QUEUE_WARNING:
            found.append(f"queue over {QUEUE_WARNING}: consider more workers")
        if self.failed_share > FAILED_SHARE_WARNING:
            found.append(f"{self.failed_share:.0%} failed: see `levers failed`")
        if self.workers_desired and not self.workers_alive:
            found.append("no worker alive")
        elif self.queued and not self.workers_desired and self.autoscale is None:
            found.append(f"{self.queued} queued and workers is 0: nothing takes them")
        if self.stranded:
            found.append(f"{self.stranded} stranded: held by workers that are gone, until requeued")
        return found


@dataclass(frozen=True)
class PipelineStatus:
    pipeline: str
    phases: list[PhaseStatus]
    supervisors: list[SupervisorLease]  # live ones, and lapsed ones not yet taken over
    config_error: str | None
    limits: list[dict[str, Any]]
    memory_percent: float | None  # the fullest supervisor host's memory use
    cpu_percent: float | None = None  # the busiest supervisor host's CPU use over the last minute
    versions: VersionStatus | None = None  # the published version, and who runs another
    # the artifact stores the live supervisors use, when they are not all one: a phase that runs
    # where the one before stored nothing fails
    stores: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "pipeline_version": self.versions.as_json() if self.versions else None,
            "supervisors": [asdict(s) for s in self.supervisors],
            "stores": self.stores,
            "config_error": self.config_error,
            "limits": self.limits,
            "memory_percent": self.memory_percent,
            "cpu_percent": self.cpu_percent,
            "phases": [{**asdict(p), "failed_share": round(p.failed_share, 4), "alerts": p.alerts}
                       for p in self.phases],
        }  # fmt: skip


def pipeline_status(
    connection: redis.Redis,
    spec: PipelineOutline,
    file_error: str | None = None,
    file: LoadedPipeline | None = None,
) -> PipelineStatus:
    """``file_error``: the file's own error when it is invalid and ``spec`` is its last good version.
    With ``file`` (the local pipeline.yaml), the published version is compared with it and with
    each supervisor's, and while supervisors run, the phases are shown with the live version's
    levers (with none running, the file is what the next one publishes, and what `levers failed`
    reads)."""
    reports = live_reports(connection, spec.name)
    versions = version_status(connection, file, reports) if file is not None else None
    if versions is not None and versions.live_outline is not None and reports:
        spec = versions.live_outline
    ledger = Ledger(connection, spec.name)
    phases = _mark_bottleneck(
        [_phase_status(connection, spec, name, ledger, reports) for name in spec.phases]
    )
    errors = [file_error] if file_error else []
    errors += [r.config_error for r in reports if r.config_error]
    limits = [limits_status(connection, spec, name) for name in spec.limits]
    memory = max((r.memory_percent for r in reports if r.memory_percent is not None), default=None)
    cpu = max((r.cpu_percent for r in reports if r.cpu_percent is not None), default=None)
    supervisors = supervisor_leases(connection, spec.name)
    error = errors[0] if errors else None
    stores = sorted({r.store for r in reports if r.store is not None})
    differing = stores if len(stores) > 1 else []
    return PipelineStatus(spec.name, phases, supervisors, error, limits, memory, cpu, versions, differing)


def _mark_bottleneck(phases: list[PhaseStatus]) -> list[PhaseStatus]:
    """The phase that holds documents up longest: the longest backlog to drain, else the busiest."""
    draining = [p for p in phases if p.drain_s]
    if draining:
        chosen = max(draining, key=lambda p: p.drain_s or 0.0)
    else:
        busy = [p for p in phases if p.utilization >= BUSY_ENOUGH]
        if not busy:
            return phases
        chosen = max(busy, key=lambda p: p.utilization)
    return [replace(p, bottleneck=p is chosen) for p in phases]


@dataclass(frozen=True)
class _Lanes:
    """A phase's lanes as one pipelined read finds them: each lane's queued jobs, the jobs waiting
    for a retry, the job at the head of each lane and the jobs held (job and execution ids)."""

    queued: dict[str, int]
    waiting_retry: int
    heads: list[str]
    held: list[tuple[str, str]]


def _read_lanes(connection: redis.Redis, lanes: dict[str, Queue]) -> _Lanes:
    with connection.pipeline(transaction=False) as pipe:
        for queue in lanes.values():
            pipe.llen(queue.key)
            pipe.zcard(ScheduledJobRegistry(queue=queue).key)
            pipe.lrange(queue.key, 0, 0)
            pipe.zrange(queue.started_job_registry.key, 0, -1)
        answers = pipe.execute()
    per_lane = [answers[at : at + 4] for at in range(0, len(answers), 4)]
    return _Lanes(
        queued={lane: int(read[0]) for lane, read in zip(lanes, per_lane, strict=True)},
        waiting_retry=sum(int(read[1]) for read in per_lane),
        heads=[read[2][0].decode(errors="replace") for read in per_lane if read[2]],
        # RQ's members are "job id:execution id"; anyone may write Redis, so nothing else breaks this
        held=[_job_and_execution(member) for read in per_lane for member in read[3]],
    )


def _job_and_execution(member: bytes) -> tuple[str, str]:
    job_id, _, execution_id = member.decode(errors="replace").partition(":")
    return job_id, execution_id


def _oldest_wait_s(connection: redis.Redis, heads: list[str]) -> float | None:
    """Age of the oldest of the jobs at the head of the lanes: one pipelined read."""
    try:
        jobs = Job.fetch_many(heads, connection, serializer=JSONSerializer)
    except (ValueError, DeserializationError):  # not a job levers or RQ wrote
        return None
    ages = []
    for job in jobs:
        if job is not None and job.enqueued_at is not None:
            enqueued = job.enqueued_at if job.enqueued_at.tzinfo else job.enqueued_at.replace(tzinfo=UTC)
            ages.append(max(0.0, (datetime.now(UTC) - enqueued).total_seconds()))
    return max(ages, default=None)


def _phase_status(
    connection: redis.Redis, spec: PipelineOutline, name: str, ledger: Ledger, reports: list[SupervisorReport]
) -> PhaseStatus:
    lanes = {
        lane: Queue(keys.queue_name(spec.name, name, lane), connection=connection, serializer=JSONSerializer)
        for lane in keys.LANES
    }
    queue = lanes[keys.NORMAL]  # every levers worker of the phase serves all its lanes
    workers = _alive(Worker.all(queue=queue), reports, name)
    alive = {w.name for w in workers}
    read = _read_lanes(connection, lanes)
    held = _holders(connection, read.held)
    if any(holder is not None and holder not in alive for holder, _ in held):
        # a worker started since the workers were read (a scale-up) may hold a job already: not
        # stranded, as it would show until the next read
        workers = _alive(Worker.all(queue=queue), reports, name)
        alive = {w.name for w in workers}
    queued = read.queued
    running_since = _running_since(held, alive)
    reported: list[PhaseReport] = [r.phases[name] for r in reports if name in r.phases]
    totals = ledger.totals(name)
    phase = spec.phases[name]
    recent = metrics.read(connection, spec.name, name, METRICS_MINUTES)
    return PhaseStatus(
        phase=name,
        queued=sum(queued.values()),
        running=len(running_since),
        claimed_ahead=sum(holder in alive for holder, _ in held) - len(running_since),
        stranded=sum(holder not in alive for holder, _ in held),
        waiting_retry=read.waiting_retry,
        done=totals.get("done", 0),
        failed=ledger.kept_failed(name, spec.failed_ttl),
        failed_attempts=totals.get("failed", 0),
        retried=totals.get("retried", 0),
        workers_desired=sum(r.desired for r in reported) if reported else phase.workers,
        workers_alive=len(workers),
        workers_busy=sum(w.get_state() == "busy" for w in workers),
        state=_worst([r.state for r in reported]) if reported else "no supervisor",
        workers=phase.workers,
        semaphore=phase.semaphore,
        threads=phase.threads,
        oldest_wait_s=_oldest_wait_s(connection, read.heads),
        throughput=recent.throughput,
        utilization=_utilization(connection, spec.name, name, workers, list(running_since.values())),
        p50_s=recent.quantile(0.5),
        p95_s=recent.quantile(0.95),
        calls_per_job=round(recent.calls_per_job, 2),
        cpu_percent=_mean([r.cpu_percent for r in reported if r.cpu_percent is not None]),
        rss_mb=_mean([r.rss_mb for r in reported if r.rss_mb is not None]),
        fixed=phase.fixed,
        autoscale=_autoscale(connection, spec, name, reports, sum(queued.values()) + len(held)),
        lanes=queued,
        reused=totals.get("reused", 0),
    )


def _autoscale(
    connection: redis.Redis, spec: PipelineOutline, name: str, reports: list[SupervisorReport], jobs: int
) -> AutoscaleStatus | None:
    phase = spec.phases[name]
    settings = phase.autoscale
    if settings is None:
        return None
    needed = math.ceil(jobs / settings.per_worker)
    used = [limit.decode(errors="replace") if isinstance(limit, bytes) else limit
            for limit in connection.smembers(keys.phase_limits(spec.name, name))]  # fmt: skip
    learned = learned_concurrency(connection, spec, used)
    for limit in used:
        declared = spec.limits.get(limit)
        if declared is not None and declared.concurrency:
            concurrency = learned.get(limit, declared.concurrency)
            needed = min(needed, workers_for(concurrency, phase.semaphore))
    reasons = [
        (report.host, report.pid, figures.autoscale.reason)
        for report in reports
        if (figures := report.phases.get(name)) is not None and figures.autoscale is not None
    ]
    if len(reasons) == 1:
        reason = reasons[0][2]
    else:
        reason = " | ".join(f"{host}:{pid}: {text}" for host, pid, text in sorted(reasons)) or "no supervisor"
    return AutoscaleStatus(
        settings.min, settings.max, settings.per_worker, settings.scale_down_after, needed, reason
    )


def _alive(workers: list[BaseWorker], reports: list[SupervisorReport], phase: str) -> list[BaseWorker]:
    """The workers alive now. levers' own (named phase.host.pid) are alive while a live report of
    their host lists them, or none has been published since they started; any other worker while
    its heartbeat is fresh."""
    listed = {
        (report.host, pid)
        for report in reports
        for pid in (report.phases[phase].pids if phase in report.phases else [])
    }
    fresh = datetime.now(UTC) - timedelta(seconds=HEARTBEAT_FRESH_S)

    def alive(worker: BaseWorker) -> bool:
        if worker.name != f"{phase}.{worker.hostname}.{worker.pid}":
            return worker.last_heartbeat is not None and worker.last_heartbeat >= fresh
        if (worker.hostname, worker.pid) in listed:
            return True
        born = worker.birth_date.timestamp() if worker.birth_date else 0.0
        return any(r.host == worker.hostname and r.updated < born for r in reports)

    return [w for w in workers if alive(w)]


def _holders(
    connection: redis.Redis, entries: list[tuple[str, str]]
) -> list[tuple[str | None, float | None]]:
    """The worker holding each job of the started registries (``entries``: job and execution ids)
    and when it took it (None: its execution has expired): one pipelined read."""
    with connection.pipeline(transaction=False) as pipe:
        for job_id, execution_id in entries:
            pipe.hmget(Execution(execution_id, job_id, connection).key, ["worker_name", "created_at"])
        found = pipe.execute() if entries else []
    return [(name.decode() if name else None, _timestamp(taken)) for name, taken in found]


def _timestamp(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw else None
    except ValueError:
        return None


def _running_since(held: list[tuple[str | None, float | None]], alive: set[str]) -> dict[str, float | None]:
    """Per alive worker holding jobs, since when it has been busy. A worker runs one job at a time:
    a second one it holds is claimed ahead (or the one before, still being completed)."""
    since: dict[str, float | None] = {}
    for holder, taken in held:
        if holder in alive:
            assert holder is not None
            earlier = [t for t in (since.get(holder), taken) if t is not None]
            since[holder] = min(earlier) if earlier else None
    return since


def _utilization(
    connection: redis.Redis,
    pipeline: str,
    phase: str,
    workers: list[BaseWorker],
    running_since: list[float | None],
) -> float:
    """Busy share of the workers' time over the last UTILIZATION_MINUTES: the finished jobs' busy
    seconds in that span and the running jobs' so far, over the workers' time alive in it."""
    now = time.time()
    recent = metrics.read(connection, pipeline, phase, UTILIZATION_MINUTES, now)
    start = now - recent.span_s
    # the workers alive now, over their time in the span; or what the supervisors counted alive,
    # when more: workers a scale-down stopped ran part of the span too
    alive_now_s = sum(now - max(start, w.birth_date.timestamp() if w.birth_date else start) for w in workers)
    capacity_s = max(alive_now_s, recent.alive_s)
    running_s = sum(now - max(start, since if since is not None else now) for since in running_since)
    return min(1.0, (recent.busy_s + running_s) / capacity_s) if capacity_s > 0 else 0.0


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 1) if values else None


def _worst(states: list[str]) -> str:
    for state in ("failing", "backoff", "stopped", "ok"):
        if state in states:
            return state
    return "ok"
