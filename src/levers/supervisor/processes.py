"""The supervisor's real side: forked worker processes and signals (its report: supervisor.reporting).

Handler modules are imported here once, before any worker is forked, so every worker shares
their pages instead of importing them again.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import ForkProcess
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType

import redis

from levers import keys
from levers.documents.failures import FailedExpiry
from levers.documents.retention import RetentionExpiry
from levers.documents.routing import register_queues
from levers.documents.store import apart_from_forks, project_store
from levers.errors import ServerError, SupervisorFailed, UsageError
from levers.pipeline.loading import LoadedPipeline, ensure_importable_from, import_handler
from levers.pipeline.watching import PipelineWatcher, lever_changes
from levers.safe import log_to
from levers.server.connection import Target, embedded_server
from levers.server.outage import REFUSED, UNREACHABLE, Outage, no_resend, reason, where
from levers.server.project import Project, save_last_good
from levers.supervisor.demand import observe
from levers.supervisor.following import Follower, copy_path
from levers.supervisor.leases import LeaseKeeper
from levers.supervisor.orphans import reap_orphans
from levers.supervisor.reconcile import ProcessHandle, Seams, Slot, SlotState, Supervisor
from levers.supervisor.reporting import Reporter
from levers.worker import rq_contract
from levers.worker.process import StrandedJobs, WorkerLogs, recover_jobs, run_worker, worker_name
from levers.worker.progress import WorkerProgress
from levers.worker.rq_worker import LeversWorker

log = logging.getLogger("levers.supervisor.reconcile")

# The longest the supervisor sleeps between ticks; a worker's death wakes it at once.
TICK_S = 0.25
# A supervisor that cannot go on lets its workers finish their jobs this long, then kills them.
GIVE_UP_WAIT_S = 10.0

_fork = multiprocessing.get_context("fork")


@dataclass(frozen=True)
class LogOptions:
    log_dir: Path | None = None  # None: stderr; else a file per phase, and supervisor.log
    verbose: bool = False  # RQ's own lines, one or more per job, too
    json: bool = False  # one JSON object per line


@dataclass(frozen=True)
class PoolOptions:
    target: Target
    logs: LogOptions = LogOptions()
    copy: Path | None = None  # the bytes of the version the supervisor runs, which its workers follow


class WorkerProcess(ForkProcess):
    """A forked worker process, and what it tells the supervisor through shared memory."""

    def __init__(self, path: Path, phase: str, options: PoolOptions) -> None:
        self.progress = WorkerProgress()
        # the supervisor's pid, known before the fork: one killed as a worker starts is seen gone
        args = (path, phase, options, self.progress, os.getpid())
        super().__init__(target=_worker_main, args=args, name=f"levers-{phase}", daemon=False)

    @property
    def jobs_started(self) -> int:
        return self.progress.jobs_started


def preload_handlers(loaded: LoadedPipeline) -> None:
    """Import every handler, and the modules under ``preload:``, before any worker is forked.

    Forked workers then share those modules' pages instead of importing them again. The imported
    objects are frozen out of the garbage collector's reach: a collection in a worker would
    otherwise write to every object it tracks and make the shared pages the worker's own.
    """
    ensure_importable_from(loaded.project_dir)
    for phase in loaded.spec.phases.values():
        import_handler(phase.handler)
    for module in loaded.spec.preload:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(
                f"preload: cannot import {module}: {exc}", fix="fix preload: in pipeline.yaml"
            ) from None
    gc.collect()
    gc.freeze()


def build_supervisor(
    project: Project, only: frozenset[str] = frozenset(), logs: LogOptions = LogOptions(),
    grace_s: float | None = None,
) -> Supervisor:  # fmt: skip
    """What `levers up` and `levers run` do before the first tick: check that the installed RQ
    has what levers' workers rely on (UnsupportedRQ), import the handlers once, keep the pipeline
    as the last good version, route the logs, and make the supervisor."""
    rq_contract.check()
    preload_handlers(project.loaded)
    save_last_good(project.loaded)
    register_queues(project.connection, project.loaded.spec)
    configure_logging(logs)
    taking = TakingUp(project.connection, project.loaded)
    watcher = PipelineWatcher(project.loaded, on_change=taking.file_changed)
    copy = copy_path(project.state_dir, os.getpid())
    by = f"{socket.gethostname()}:{os.getpid()}"
    # its first tick publishes the file or follows the newest version: a start that fails before
    # (a metrics address taken, say) publishes nothing
    follower = Follower(project.connection, watcher, copy, by, took_up=taking.followed)
    supervisor = make_supervisor(watcher, project.connection, PoolOptions(project.target, logs, copy), only)
    supervisor.grace_s = grace_s
    supervisor.follower = follower
    return supervisor


def revive_embedded(project: Project) -> Callable[[], object]:
    """For a project on the embedded server: start it again if its process is gone (killed, or
    the host's OOM killer), so the pipeline does not wait for a person. Its append-only file keeps
    every queued document; on another kind of Redis, waiting for it is all a supervisor can do."""
    if not project.target.embedded:
        return lambda: None
    server = embedded_server(project.loaded)

    def revive() -> None:
        started = server.restart_if_gone()
        if started is not None:
            log.warning("the embedded server was gone: started it again on port %d", started.port)

    return revive


class EditNotice:
    """One log line when the pipeline turns invalid (a bad edit of the file, or a bad published
    version), and one when it is valid again: the workers keep the last good version meanwhile,
    and without it the error would show in `levers status` alone."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.shown = self._error()

    def _error(self) -> str | None:
        follower = self.supervisor.follower
        return self.supervisor.watcher.error or (follower.error if follower is not None else None)

    def tick(self) -> None:
        error = self._error()
        if error == self.shown:
            return
        if error is not None:
            log.warning("the pipeline has an error; the workers keep the last good version: %s", error)
        else:
            log.info("the pipeline is valid again")
        self.shown = error


class TakingUp:
    """What follows a new valid version, of the file or published by another host: keep it as
    the last good version and register its queues; for the file, say which levers moved."""

    def __init__(self, connection: redis.Redis, first: LoadedPipeline) -> None:
        self.connection = connection
        self.running = first

    def file_changed(self, loaded: LoadedPipeline) -> None:
        moved = lever_changes(self.running.spec, loaded.spec) or "no lever moved"
        log.info("pipeline.yaml changed: %s", moved)
        self.followed(loaded)

    def followed(self, loaded: LoadedPipeline) -> None:
        """Neither step is worth a supervisor: a failure is a warning, and the next version tries again."""
        self.running = loaded
        try:
            save_last_good(loaded)
        except OSError as exc:
            log.warning("could not keep the last good pipeline: %s", exc)
        try:
            register_queues(self.connection, loaded.spec)
        except redis.RedisError as exc:
            log.warning("could not register the queues of the new pipeline: %s", exc)


def make_supervisor(
    watcher: PipelineWatcher, connection: redis.Redis, options: PoolOptions, only: frozenset[str]
) -> Supervisor:
    def queues() -> list[str]:
        spec = watcher.current().spec
        phases = [phase for phase in spec.phases if not only or phase in only]
        return [name for phase in phases for name in keys.lane_queues(spec.name, phase)]

    stranded = StrandedJobs(connection, queues)

    def spawn(phase: str, loaded: LoadedPipeline) -> ProcessHandle:
        process = WorkerProcess(loaded.path, phase, options)
        # A stop signal that reached the new process before its own handlers would run the
        # supervisor's handler there, and be lost: the worker would run on until the stop's
        # deadline. Blocked here, it waits for the worker to unblock it (_worker_main).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        return process

    def recover(slot: Slot) -> list[str]:
        _end_process_group(slot.pid)
        spec = watcher.current().spec
        retries = spec.phases[slot.phase].retries if slot.phase in spec.phases else 0
        assert isinstance(slot.process, WorkerProcess)
        # a job the supervisor cut short did not kill its worker
        cut_short = slot.state is SlotState.CUT_SHORT
        struck = (lambda job_id: False) if cut_short else slot.process.progress.running
        recovered = recover_jobs(connection, spec.name, worker_name(slot.phase, slot.pid), retries, struck)
        if slot.process.exitcode != 0:  # a worker that exits on its own leaves nothing half taken
            for name in keys.lane_queues(spec.name, slot.phase):
                stranded.note(name)
        return recovered

    def is_busy(slot: Slot) -> bool:
        key = LeversWorker.redis_worker_namespace_prefix + worker_name(slot.phase, slot.pid)
        return connection.hget(key, "state") == b"busy"

    supervisor = Supervisor(watcher, Seams(spawn, recover, stranded.requeue_due, is_busy))
    supervisor.only = only
    supervisor.seams.observe = lambda spec, phases: observe(connection, spec, phases, supervisor.id)
    return supervisor


def _end_process_group(pid: int) -> None:
    """Stop what a dead worker left behind (RQ's scheduler process, say): it led its own group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _worker_main(
    path: Path, phase: str, options: PoolOptions, progress: WorkerProgress, supervisor_pid: int
) -> None:
    # until RQ installs its own handlers, a stop signal ends the worker: it holds no job yet
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    logs = options.logs
    if logs.log_dir is not None:
        logs.log_dir.mkdir(parents=True, exist_ok=True)
        with (logs.log_dir / f"{phase}.log").open("ab") as log_file:
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
    run_worker(
        path, phase, options.target.url, options.target.embedded, progress, supervisor_pid,
        WorkerLogs(verbose=logs.verbose, json=logs.json), options.copy,
    )  # fmt: skip


def start_exporter(supervisor: Supervisor, target: Target, host: str, port: int) -> BaseProcess:
    """Serve /metrics from a process of its own; the address is checked here, so a clash is one line."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind(address)
    except OSError as exc:
        message = f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}"
        raise UsageError(message, fix="pick another --metrics-host or --metrics-port") from None
    from levers.observing.exporter import serve

    # a watcher of its own, of the version the supervisor runs: taking up an edit (and saying so)
    # is the supervisor's
    watcher, copy = supervisor.watcher, supervisor.follower.copy if supervisor.follower else None
    own = PipelineWatcher(watcher.current(), error=watcher.error, source=copy)
    args = (own, target, host, port, os.getpid())
    process = _fork.Process(target=serve, args=args, name="levers-metrics", daemon=True)
    process.start()
    return process


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def log_started(project: Project, supervisor: Supervisor, metrics_at: str | None) -> None:
    """The line that says the service is up, and where to find it."""
    desired = supervisor.desired()
    phases, workers = list(desired), sum(desired.values())
    log.info(
        "started: phases %s; %d worker(s); Redis %s (levers url --show-password for rq info and "
        "rq-dashboard); %s; Ctrl-C to stop",
        ", ".join(phases), workers, project.target.masked,
        f"metrics at {metrics_at}" if metrics_at else "no metrics (--metrics-port)",
    )  # fmt: skip


class StoppedBeforeStart(BaseException):
    """A stop signal came before the supervisor was made: nothing runs yet, and the start ends.
    Not an Exception, as KeyboardInterrupt is not: no step of the start takes it for its own failure."""


class SignalLatch:
    """Turns SIGTERM and SIGINT into stop requests: the first graceful, the second forceful.

    Installed before anything else is done, it ends a start that a signal interrupts (until
    ``attach``): a container's PID 1 is spared every signal it has no handler for, so without
    one, a stop while `levers up` starts would go unheard and the platform would wait out its
    grace, then SIGKILL the workers started meanwhile."""

    def __init__(self, supervisor: Supervisor | None = None) -> None:
        self.supervisor = supervisor
        self.count = 0

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def attach(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.supervisor is None:
            raise StoppedBeforeStart
        self.count += 1
        self.supervisor.request_stop(force=self.count > 1)


SUPERVISOR_LOG_FORMAT = "%(asctime)s %(levelname)s [supervisor pid=%(process)d] %(message)s"


def configure_logging(logs: LogOptions) -> None:
    """Supervisor logs go to stderr, or to ``log_dir/supervisor.log`` when a progress bar owns it;
    one line per message, whatever names it carries."""
    handler: logging.Handler
    if logs.log_dir is None:
        handler = logging.StreamHandler()
    else:
        logs.log_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(logs.log_dir / "supervisor.log")
    log_to(handler, SUPERVISOR_LOG_FORMAT, {"role": "supervisor"} if logs.json else None, logs.verbose)


def run(
    supervisor: Supervisor, connection: redis.Redis, until: Callable[[], bool] = lambda: False,
    revive: Callable[[], object] = lambda: None, beat: Callable[[], object] = lambda: None,
) -> None:  # fmt: skip
    """Tick until a stop completes (or ``until()`` holds, then stop gracefully).

    While Redis cannot be reached, ticks go on with backoff: the workers wait for it too, and a
    dead worker's jobs are recovered once it answers. ``revive`` is called meanwhile: it starts the
    embedded server again if its process is gone. ``beat`` is called on every pass, outages
    included (levers.supervisor.health). What the supervisor cannot get past (Redis
    refusing its credentials, an error of its own) stops its workers and raises SupervisorFailed,
    so that the process exits non-zero and its platform starts it again.
    """
    no_resend(connection)
    reporter = Reporter(connection, supervisor)
    lease = LeaseKeeper(connection, supervisor)
    outage = Outage(connection, log)
    expiry = FailedExpiry(connection)
    retention = RetentionExpiry(connection)
    edits = EditNotice(supervisor)
    try:
        while not supervisor.finished():
            beat()
            reaped = reap_orphans()  # Redis outages included: it needs none
            if reaped:
                log.debug("reaped %d orphaned process(es)", reaped)
            try:
                supervisor.tick()
                edits.tick()
                lease.tick()  # it waits out an outage itself: a lapsed lease is renewed once Redis answers
                reporter.publish()
                _expire_failed(expiry, supervisor.watcher)
                _expire_done(retention, supervisor.watcher)
                if outage.on:
                    connection.ping()  # the tick may have had nothing to ask of Redis
                if not supervisor.stopping and until():
                    supervisor.request_stop()
            except REFUSED:
                raise
            except UNREACHABLE as exc:
                if supervisor.stop_overdue():
                    raise SupervisorFailed(
                        f"stopped without reaching Redis at {where(connection)}: the jobs its workers held "
                        "stay theirs until a supervisor recovers them",
                        fix="start `levers up` again once Redis answers",
                    ) from None
                time.sleep(outage.failed(exc))
                _revive(revive)
                continue
            outage.over()
            _wait_for_news(supervisor)
    except Exception as exc:
        _give_up(supervisor)
        if isinstance(exc, SupervisorFailed):
            raise
        if isinstance(exc, REFUSED):
            raise SupervisorFailed(
                f"Redis at {where(connection)} refused the credentials: {reason(exc)}",
                fix="check the password in the URL; the workers were stopped",
            ) from None
        log.exception("the supervisor cannot go on")
        raise SupervisorFailed(
            f"the supervisor cannot go on: {reason(exc)}", fix="its workers were stopped; start it again"
        ) from None
    finally:
        reporter.withdraw()
        if supervisor.finished():  # else the lease lapses, and another supervisor takes the jobs over
            lease.release()
            if supervisor.follower is not None:
                supervisor.follower.close()


def _revive(revive: Callable[[], object]) -> None:
    try:
        revive()
    except ServerError as exc:  # the next failed tick tries again
        log.warning("could not start the embedded server again: %s", exc)


def _expire_failed(expiry: FailedExpiry, watcher: PipelineWatcher) -> None:
    """Forget failed documents past failed_ttl (once a minute), so Redis stays bounded."""
    if not expiry.due():
        return
    loaded = watcher.current()
    forgotten = apart_from_forks(loaded.spec.store, lambda: expiry.expire(loaded.spec, project_store(loaded)))
    if forgotten:
        log.info("forgot %d failed document(s) older than failed_ttl", forgotten)


def _expire_done(retention: RetentionExpiry, watcher: PipelineWatcher) -> None:
    """Expire done documents' records past ``retention`` (once a minute), keeping their ids."""
    expired = retention.tick(watcher.current().spec)
    if expired:
        log.info("expired the records of %d document(s) done longer ago than retention", expired)


def _wait_for_news(supervisor: Supervisor) -> None:
    """Until the next tick: TICK_S, or less if a worker dies."""
    sentinels = [s.process.sentinel for s in supervisor.slots if hasattr(s.process, "sentinel")]
    if sentinels:
        multiprocessing.connection.wait(sentinels, timeout=TICK_S)
    else:
        time.sleep(TICK_S)


def _give_up(supervisor: Supervisor) -> None:
    """Stop every worker: each may finish its job within GIVE_UP_WAIT_S, then the rest are cut
    short, and their jobs go back to their queues if Redis answers."""
    # the supervisor's own state may be what failed: each step is tried on its own
    with contextlib.suppress(Exception):
        supervisor.request_stop()
    deadline = time.monotonic() + GIVE_UP_WAIT_S
    while any(s.process.exitcode is None for s in supervisor.slots) and time.monotonic() < deadline:
        time.sleep(TICK_S)
    with contextlib.suppress(Exception):
        supervisor.request_stop(force=True)
    for slot in supervisor.slots:
        slot.process.kill()
        with contextlib.suppress(Exception):  # recovery needs Redis; the worker's process group ends anyway
            supervisor.seams.recover(slot)
