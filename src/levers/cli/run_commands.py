"""`levers up`, `down`, `url`, `submit` and `run`: the pipeline's processes and the documents fed to them."""

from __future__ import annotations

import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from levers.cli import console
from levers.cli.options import (
    FileOption,
    JsonOption,
    KeepVersionsOption,
    NoReuseOption,
    Priority,
    PriorityOption,
    reports_errors,
)
from levers.errors import EXIT_BAD_INPUT, EXIT_FAILURE, UsageError
from levers.pipeline.model import MAX_TIMEOUT_S, MAX_WORKERS

if TYPE_CHECKING:
    from levers.pipeline.loading import LoadedPipeline
    from levers.server.project import Project
    from levers.supervisor.reconcile import Supervisor


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"


@reports_errors
def up(
    file: FileOption = None,
    phase: Annotated[
        list[str] | None, typer.Option("--phase", "-p", help="Run only this phase's workers (repeatable).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            metavar="PORT", min=1, max=65535, help="Serve Prometheus metrics at http://HOST:PORT/metrics."
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            metavar="HOST",
            help="The address metrics are served on; 0.0.0.0 for every interface (containers).",
        ),
    ] = "127.0.0.1",
    grace: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0,
            max=MAX_TIMEOUT_S,
            help="How long a stop waits for running jobs before putting them back on their queues "
            "(default: the longest phase timeout). Set the platform's grace a few seconds longer.",
        ),
    ] = None,
    log_format: Annotated[
        LogFormat, typer.Option(help="text: one line per event; json: one JSON object per line.")
    ] = LogFormat.TEXT,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log RQ's own lines too, one or more per job.")
    ] = False,
    workers: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            min=1,
            max=MAX_WORKERS,
            help="Run N workers of each phase, whatever pipeline.yaml's workers and autoscale say: "
            "for platforms whose replicas carry the count (`levers deploy k8s` runs 1 per pod).",
        ),
    ] = None,
    health_file: Annotated[
        Path | None,
        typer.Option(
            metavar="PATH",
            help="Touch PATH every second while the supervisor's loop runs (Redis outages too), "
            "for a liveness probe that checks its age.",
        ),
    ] = None,
) -> None:
    """Start and supervise every phase's workers until SIGTERM or Ctrl-C (twice: at once)."""
    from levers.supervisor import processes as pool
    from levers.supervisor.health import HealthFile

    latch = pool.SignalLatch()
    latch.install()
    try:
        project, supervisor = _start(file, frozenset(phase or []), grace, workers, verbose, log_format)
    except pool.StoppedBeforeStart:
        console.note("stopped while starting: no worker had started")
        return
    latch.attach(supervisor)
    health = HealthFile(health_file) if health_file is not None else None
    exporter = (
        pool.start_exporter(supervisor, project.target, metrics_host, metrics_port) if metrics_port else None
    )
    metrics_at = f"http://{metrics_host}:{metrics_port}/metrics" if metrics_port else None
    pool.log_started(project, supervisor, metrics_at)
    try:
        pool.run(
            supervisor,
            project.connection,
            revive=pool.revive_embedded(project),
            beat=health.beat if health is not None else lambda: None,
        )
    finally:
        if exporter is not None:
            exporter.terminate()
    pool.log.info("stopped")


def _start(
    file: Path | None, only: frozenset[str], grace: float | None, workers: int | None, verbose: bool,
    log_format: LogFormat,
) -> tuple[Project, Supervisor]:  # fmt: skip
    """`levers up` up to its supervisor's loop: the project opened (the embedded server started),
    what `levers down` stopped started again, the handlers imported and the supervisor made."""
    from levers.pipeline.loading import load_pipeline
    from levers.server.embedded import start_recorded
    from levers.server.pipeline_file import pipeline_path
    from levers.server.project import open_project
    from levers.supervisor import processes as pool

    # refused before anything is started (the embedded server, say)
    unknown = only - set(load_pipeline(pipeline_path(file)).outline.phases)
    if unknown:
        raise UsageError(f"no phase named {', '.join(sorted(unknown))}", fix="see `levers validate`")
    project = open_project(file, check_imports=True, start=True)
    # what `levers down` stopped (a phase's graph database, say) comes back on its own address
    start_recorded(project.state_dir, skip=None if project.target.embedded else project.state_dir / "redis")
    logs = pool.LogOptions(verbose=verbose, json=log_format is LogFormat.JSON)
    supervisor = pool.build_supervisor(project, only, logs, grace_s=grace)
    supervisor.workers = workers
    return project, supervisor


@reports_errors
def url(
    file: FileOption = None,
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password too, for the tool it is given to.")
    ] = False,
) -> None:
    """Print the URL of the pipeline's Redis, to give `rq info --url` or rq-dashboard (password masked)."""
    from levers.pipeline.loading import load_pipeline
    from levers.server.connection import redis_address
    from levers.server.masking import masked
    from levers.server.pipeline_file import pipeline_path

    address, running = redis_address(load_pipeline(pipeline_path(file)))
    console.out.print(address if show_password else masked(address), soft_wrap=True)
    if running is False:
        console.note("the embedded server is not running now (start it with `levers up` or `levers run`)")


@reports_errors
def down(file: FileOption = None) -> None:
    """Stop the embedded servers under .levers/: Redis, and those phases started. Data stays."""
    from levers.pipeline.loading import load_pipeline
    from levers.server.embedded import servers_under
    from levers.server.pipeline_file import pipeline_path

    loaded = load_pipeline(pipeline_path(file))
    supervising = _supervisors_on_embedded(loaded)
    if supervising:
        raise UsageError(
            f"`levers up` runs on this project's embedded server ({', '.join(supervising)}): "
            "it would start the servers again at once",
            fix="stop it first (Ctrl-C or SIGTERM), then `levers down`",
        )
    servers = servers_under(loaded.state_dir)
    for server in servers:
        server.stop()
    console.note(
        f"stopped {len(servers)} embedded server(s)" if servers else "no embedded server was running"
    )


def _supervisors_on_embedded(loaded: LoadedPipeline) -> list[str]:
    """The live supervisors of the pipeline on its embedded server, if that is its Redis and it
    runs: "host pid N" each."""
    import socket

    import psutil
    import redis

    from levers.observing.reports import live_reports
    from levers.server.connection import configured_url, embedded_server

    running = None if configured_url(loaded) is not None else embedded_server(loaded, start=False).running()
    if running is None:
        return []
    with redis.Redis.from_url(running.url, socket_connect_timeout=5, socket_timeout=5) as connection:
        try:
            reports = live_reports(connection, loaded.outline.name)
        except redis.RedisError:  # not answering: nothing it could say stops the servers
            return []
    # a supervisor killed a moment ago still has a fresh report: the process is asked too
    here = socket.gethostname()
    alive = [r for r in reports if r.host != here or psutil.pid_exists(r.pid)]
    return [f"{report.host} pid {report.pid}" for report in alive]


@reports_errors
def submit(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (recursive), globs; '-' for stdin.")],
    file: FileOption = None,
    name: Annotated[str | None, typer.Option(help="The document's name when reading stdin.")] = None,
    force: Annotated[bool, typer.Option(help="Process documents again even if already submitted.")] = False,
    no_reuse: NoReuseOption = False,
    wait: Annotated[bool, typer.Option(help="Show progress until every document is done or failed.")] = False,
    priority: PriorityOption = Priority.NORMAL,
    keep_versions: KeepVersionsOption = False,
    as_json: JsonOption = False,
) -> None:
    """Feed documents into the pipeline; prints one id per document."""
    from levers.documents.submission import Submitter
    from levers.server.project import open_project

    if "-" in paths and not name:
        raise UsageError("reading a document from stdin needs its name", fix="add --name FILE.pdf")
    project = open_project(file, start=True, last_good=True)
    if project.file_error:
        for line in [*project.file_error.splitlines(), "(submitting with the last good version of the file)"]:
            console.error(line)
    submitter = Submitter(project.loaded, project.connection)
    if "-" in paths:
        assert name is not None
        data = sys.stdin.buffer.read()
        results = [
            submitter.submit_bytes(
                data, name, force, priority=priority.value, keep_versions=keep_versions, reuse=not no_reuse
            )
        ]
        paths = [p for p in paths if p != "-"]
    else:
        results = []
    results += submitter.submit_paths(
        paths, force, priority.value, keep_versions=keep_versions, reuse=not no_reuse
    )
    console.outcomes(results, as_json)
    if any(r.doc_id and not r.skipped for r in results) and not _supervised(project):
        console.note("no supervisor is running: `levers up` (or `levers run`) processes them"
                     + ("; waiting for one (Ctrl-C stops waiting)" if wait else ""))  # fmt: skip
    all_done = _wait_for(project, [r.doc_id for r in results if r.doc_id]) if wait else True
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_BAD_INPUT)
    if not all_done:  # a document failed, as `levers run` says
        raise typer.Exit(EXIT_FAILURE)


def _supervised(project: Project) -> bool:
    """Whether a supervisor of the pipeline runs anywhere (its report is fresh)."""
    from levers.observing.reports import live_reports

    return bool(live_reports(project.connection, project.loaded.outline.name))


def _wait_for(project: Any, doc_ids: list[str]) -> bool:
    """Show progress until every document is done or failed; True when none failed."""
    from levers.documents.ledger import DocStatus, Ledger

    ledger = Ledger(project.connection, project.loaded.spec.name)
    with console.DocumentProgress(len(doc_ids)) as progress:
        while True:
            records = ledger.get_many(doc_ids)
            progress.update(records)
            if all(r and r.status in (DocStatus.DONE, DocStatus.FAILED) for r in records):
                return all(r and r.status is DocStatus.DONE for r in records)
            time.sleep(0.2)


@reports_errors
def run(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (recursive) or globs.")],
    file: FileOption = None,
    force: Annotated[bool, typer.Option(help="Process documents again even if already done.")] = False,
    no_reuse: NoReuseOption = False,
    priority: PriorityOption = Priority.NORMAL,
    keep_versions: KeepVersionsOption = False,
) -> None:
    """Process documents end to end: server, workers, submit, wait, summary, then a clean stop."""
    from levers.cli.run import run_documents

    ok = run_documents(file, paths, force, priority.value, keep_versions, reuse=not no_reuse)
    if not ok:
        raise typer.Exit(EXIT_FAILURE)
