"""The `levers` command. Thin: each command parses its options, calls one module, and prints."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from levers.cli import console
from levers.errors import EXIT_BAD_INPUT, EXIT_FAILURE, LeversError, SpecError, UsageError

app = typer.Typer(
    help="Run a phased document pipeline on RQ workers, its parallelism declared in pipeline.yaml.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="The pipeline file (default: $LEVERS_FILE, else ./pipeline.yaml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]

F = TypeVar("F", bound=Callable[..., Any])


def reports_errors(command: F) -> F:
    """Turn levers' errors into red lines and an exit code, never a traceback."""

    @wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except LeversError as exc:
            console.error(exc)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@reports_errors
def validate(file: FileOption = None, as_json: JsonOption = False) -> None:
    """Check pipeline.yaml: the model, the links between phases, and that every handler imports."""
    from levers.pipeline.loading import load_pipeline
    from levers.server.project import pipeline_path

    path = pipeline_path(file)
    try:
        loaded = load_pipeline(path, check_imports=True)
    except SpecError as exc:
        if as_json:
            console.print_json({"valid": False, "problems": [p.__dict__ for p in exc.problems]})
            raise typer.Exit(EXIT_BAD_INPUT) from None
        raise
    if as_json:
        console.print_json({"valid": True, "file": str(path), "phases": list(loaded.spec.phases)})
    else:
        console.note(f"{path}: valid ({len(loaded.spec.phases)} phases: {', '.join(loaded.spec.phases)})")


@app.command()
def schema() -> None:
    """Print the JSON Schema of pipeline.yaml (editors use it to complete and check the file)."""
    from levers.pipeline.schema import pipeline_schema

    sys.stdout.write(json.dumps(pipeline_schema(), indent=2) + "\n")


@app.command()
@reports_errors
def procfile(file: FileOption = None) -> None:
    """Print a Procfile with one process type per phase, so a platform can scale each on its own."""
    from levers.pipeline.loading import load_pipeline
    from levers.pipeline.procfile import render_procfile
    from levers.server.project import pipeline_path

    sys.stdout.write(render_procfile(load_pipeline(pipeline_path(file)).spec, file))


@app.command()
@reports_errors
def up(
    file: FileOption = None,
    phase: Annotated[
        list[str] | None, typer.Option("--phase", "-p", help="Run only this phase's workers (repeatable).")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus metrics at http://HOST:PORT/metrics.")
    ] = None,
    grace: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0,
            help="How long a stop waits for running jobs before putting them back on their queues "
            "(default: the longest phase timeout). Set the platform's grace a few seconds longer.",
        ),
    ] = None,
) -> None:
    """Start and supervise every phase's workers until SIGTERM or Ctrl-C (twice: at once)."""
    from levers.server.embedded import start_recorded
    from levers.server.project import open_project
    from levers.supervisor import processes as pool

    project = open_project(file, check_imports=True, start=True)
    only = frozenset(phase or [])
    unknown = only - set(project.loaded.spec.phases)
    if unknown:
        raise UsageError(f"no phase named {', '.join(sorted(unknown))}", fix="see `levers validate`")
    # what `levers down` stopped (a phase's graph database, say) comes back on its own address
    start_recorded(project.state_dir, skip=None if project.target.embedded else project.state_dir / "redis")
    supervisor = pool.build_supervisor(project, only, grace_s=grace)
    exporter = pool.start_exporter(supervisor.watcher, project.target, metrics_port) if metrics_port else None
    pool.SignalLatch(supervisor).install()
    phases = sorted(only) or list(project.loaded.spec.phases)
    console.note(f"levers: supervising {', '.join(phases)} on {project.target.masked} {URL_HINT}")
    try:
        pool.run(supervisor, project.connection)
    finally:
        if exporter is not None:
            exporter.terminate()
    console.note("levers: stopped")


URL_HINT = "(for rq info and rq-dashboard: levers url --show-password)"


@app.command()
@reports_errors
def url(
    file: FileOption = None,
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password too, for the tool it is given to.")
    ] = False,
) -> None:
    """Print the URL of the pipeline's Redis, to give `rq info --url` or rq-dashboard (password masked)."""
    from levers.pipeline.loading import load_pipeline
    from levers.server.connection import masked, redis_address
    from levers.server.project import pipeline_path

    address, running = redis_address(load_pipeline(pipeline_path(file)))
    console.out.print(address if show_password else masked(address), soft_wrap=True)
    if running is False:
        console.note("the embedded server is not running now (start it with `levers up` or `levers run`)")


@app.command()
@reports_errors
def down(file: FileOption = None) -> None:
    """Stop the embedded servers under .levers/: Redis, and those phases started. Data stays."""
    from levers.pipeline.loading import load_pipeline
    from levers.server.embedded import servers_under
    from levers.server.project import pipeline_path

    servers = servers_under(load_pipeline(pipeline_path(file)).state_dir)
    for server in servers:
        server.stop()
    console.note(
        f"stopped {len(servers)} embedded server(s)" if servers else "no embedded server was running"
    )


@app.command()
@reports_errors
def submit(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (recursive), globs; '-' for stdin.")],
    file: FileOption = None,
    name: Annotated[str | None, typer.Option(help="The document's name when reading stdin.")] = None,
    force: Annotated[bool, typer.Option(help="Process documents again even if already submitted.")] = False,
    wait: Annotated[bool, typer.Option(help="Show progress until every document is done or failed.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Feed documents into the pipeline; prints one id per document."""
    from levers.documents.submission import Submitter
    from levers.server.project import open_project

    project = open_project(file, start=True, last_good=True)
    if project.file_error:
        for line in [*project.file_error.splitlines(), "(submitting with the last good version of the file)"]:
            console.error(line)
    submitter = Submitter(project.loaded, project.connection)
    if "-" in paths:
        if not name:
            raise UsageError("reading a document from stdin needs its name", fix="add --name FILE.pdf")
        results = [submitter.submit_bytes(sys.stdin.buffer.read(), name, force)]
        paths = [p for p in paths if p != "-"]
    else:
        results = []
    results += submitter.submit_paths(paths, force)
    console.outcomes(results, as_json)
    if wait:
        _wait_for(project, [r.doc_id for r in results if r.doc_id])
    if not all(r.ok for r in results):
        raise typer.Exit(EXIT_BAD_INPUT)


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


@app.command()
@reports_errors
def run(
    paths: Annotated[list[str], typer.Argument(help="Files, directories (recursive) or globs.")],
    file: FileOption = None,
    force: Annotated[bool, typer.Option(help="Process documents again even if already done.")] = False,
) -> None:
    """Process documents end to end: server, workers, submit, wait, summary, then a clean stop."""
    from levers.cli.run import run_documents

    ok = run_documents(file, paths, force)
    if not ok:
        raise typer.Exit(EXIT_FAILURE)


@app.command("set")
@reports_errors
def set_levers(
    assignments: Annotated[
        list[str],
        typer.Argument(metavar="KEY=VALUE...", help="e.g. chunking.semaphore=15 extraction.workers=5"),
    ],
    file: FileOption = None,
) -> None:
    """Change settings in pipeline.yaml, keeping its comments and layout; running workers follow."""
    from levers.observing.applying import await_supervisors
    from levers.pipeline.editing import set_values
    from levers.server.project import pipeline_path

    updated, changes = set_values(pipeline_path(file), assignments)
    if not changes:
        console.note("nothing changed")
        return
    console.changes(changes)
    console.applied(await_supervisors(updated))


@app.command()
@reports_errors
def get(
    key: Annotated[str, typer.Argument(help="e.g. chunking.semaphore or phases.chunking.timeout")],
    file: FileOption = None,
) -> None:
    """Print one setting's effective value (defaults included)."""
    from levers.pipeline.editing import get_value
    from levers.pipeline.loading import load_pipeline
    from levers.server.connection import masked_values
    from levers.server.project import pipeline_path

    value = masked_values(get_value(load_pipeline(pipeline_path(file)), key))
    console.print_json(value) if isinstance(value, (dict, list)) else console.out.print(str(value))


@app.command()
@reports_errors
def status(
    file: FileOption = None,
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every second.")] = False,
) -> None:
    """Per phase: queued, running, done, failed, and workers alive/desired."""
    from levers.observing.status import PipelineStatus, pipeline_status
    from levers.server.project import open_project

    project = open_project(file, last_good=True)

    def read() -> PipelineStatus:
        return pipeline_status(project.connection, project.loaded.spec, project.file_error)

    if as_json:
        console.print_json(read().as_json())
    elif watch:
        console.watch_status(read, project.target.masked)
    else:
        console.status_table(read(), project.target.masked)


@app.command()
@reports_errors
def advise(file: FileOption = None, as_json: JsonOption = False) -> None:
    """Check live figures against the known symptoms; each finding says which lever to move."""
    from levers.observing.advice import advise as find
    from levers.observing.status import pipeline_status
    from levers.server.project import open_project

    project = open_project(file, last_good=True)
    findings = find(pipeline_status(project.connection, project.loaded.spec, project.file_error))
    if as_json:
        console.print_json([finding.__dict__ for finding in findings])
    else:
        console.findings(findings)


@app.command()
@reports_errors
def show(
    doc_id: Annotated[str, typer.Argument(metavar="ID", help="A document id (a unique prefix will do).")],
    file: FileOption = None,
    as_json: JsonOption = False,
) -> None:
    """One document's timeline: each phase's start, time, attempts, errors and output."""
    from levers.documents.lookup import document_view

    record, outputs = document_view(file, doc_id)
    if as_json:
        console.print_json({"document": record.__dict__, "outputs": outputs})
    else:
        console.document_timeline(record, outputs)


@app.command()
@reports_errors
def plan(
    file: FileOption = None,
    assignments: Annotated[
        list[str] | None,
        typer.Option("--set", metavar="KEY=VALUE", help="What if: extraction.workers=6 (file unchanged)."),
    ] = None,
    base: Annotated[
        Path | None, typer.Option("--base", help="Compare with this pipeline file, e.g. the one on main.")
    ] = None,
    burst: Annotated[int | None, typer.Option(min=1, help="Time to drain a burst of N documents.")] = None,
    rate: Annotated[
        str | None, typer.Option(help="Does a steady rate keep up? e.g. 10/hour, 0.5/s, 30/min.")
    ] = None,
    fmt: Annotated[str, typer.Option("--format", help="table, or markdown for a PR comment.")] = "table",
    measured: Annotated[
        bool, typer.Option(help="Use job times measured in the last hour where there are any.")
    ] = True,
    as_json: JsonOption = False,
) -> None:
    """Capacity per phase: throughput, bottleneck, latency, burst drain, CPU and RAM; what-ifs with --set."""
    from levers.planning.capacity import parse_rate
    from levers.planning.views import PlanFormat, render
    from levers.planning.whatif import measured_times, plan_report
    from levers.server.project import pipeline_path

    if fmt not in PlanFormat.__members__:
        raise UsageError(f"unknown format {fmt!r}", fix="use --format table or --format markdown")
    arrival = parse_rate(rate) if rate is not None else None
    path = pipeline_path(file)
    times = measured_times(path) if measured else None
    report = plan_report(path, assignments or [], base, burst, arrival, measured=times)
    if as_json:
        console.print_json(report.as_json())
    else:
        # soft wrap: a markdown table row must stay one line, however wide the terminal
        console.out.print(render(report, PlanFormat(fmt)), soft_wrap=fmt == PlanFormat.markdown)


# `levers graph`: read the knowledge graph a phase writes. The phase's code does the reading: its
# handler's module provides search() and counts(), imported only when a graph command runs.
graph_app = typer.Typer(help="Search and count the knowledge graph a phase writes.", no_args_is_help=True)
app.add_typer(graph_app, name="graph")

from levers.cli.graph import GRAPH_HANDLER  # noqa: E402  (help text below names it)

GraphPhaseOption = Annotated[
    str | None,
    typer.Option(
        "--phase", "-p", help=f"The phase that writes the graph (default: the one running {GRAPH_HANDLER})."
    ),
]
GroupOption = Annotated[
    str | None, typer.Option("--group", help="The graph, by group id (default: the phase's group_id option).")
]


@graph_app.command("search")
@reports_errors
def graph_search(
    query: Annotated[str, typer.Argument(help="Words to look for (BM25 over facts and episodes).")],
    file: FileOption = None,
    group: GroupOption = None,
    limit: Annotated[int, typer.Option("--limit", "-n", min=1, help="At most this many results.")] = 10,
    phase: GraphPhaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """The facts and episodes of the knowledge graph that match QUERY, best first."""
    from levers.cli.graph import call_graph_phase

    results = call_graph_phase(file, phase, "search", group, query=query, limit=limit)
    console.graph_results(query, results, as_json)


@graph_app.command("counts")
@reports_errors
def graph_counts(
    file: FileOption = None,
    group: GroupOption = None,
    phase: GraphPhaseOption = None,
    as_json: JsonOption = False,
) -> None:
    """How many episodes, entities and edges the knowledge graph holds."""
    from levers.cli.graph import call_graph_phase

    console.graph_counts(call_graph_phase(file, phase, "counts", group), as_json)
