"""`levers status`, `advise`, `show` and `plan`: where the pipeline stands and what it can do."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from levers.cli import console
from levers.cli.options import FileOption, JsonOption, reports_errors
from levers.errors import UsageError


@reports_errors
def status(
    file: FileOption = None,
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every second.")] = False,
) -> None:
    """Per phase: queued, running, done, failed, and workers alive/desired."""
    from levers.observing.status import PipelineStatus, pipeline_status
    from levers.pipeline.watching import PipelineWatcher
    from levers.server.project import open_project

    project = open_project(file, last_good=True)
    # each refresh of --watch reads the file again: a `levers set` shows at the next one
    watcher = PipelineWatcher(project.loaded, error=project.file_error)

    def read() -> PipelineStatus:
        loaded = watcher.current()
        return pipeline_status(project.connection, loaded.spec, watcher.error, file=loaded)

    if as_json:
        console.print_json(read().as_json())
    elif watch:
        console.watch_status(read, project.target.masked)
    else:
        console.status_table(read(), project.target.masked)


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


@reports_errors
def show(
    doc_id: Annotated[
        str,
        typer.Argument(
            metavar="ID|NAME",
            help="A document id (a unique prefix will do), or a document's name (its path, or file "
            "name when unique) to list its versions.",
        ),
    ],
    file: FileOption = None,
    as_json: JsonOption = False,
) -> None:
    """One document's timeline: each phase's start, time, attempts, errors and output; or the
    versions of a name: each one's id, content hash, when it came and its status."""
    from levers.documents.lookup import NameVersions, show_view

    view = show_view(file, doc_id)
    if isinstance(view, NameVersions):
        console.name_versions(view, as_json)
        return
    record, outputs = view
    if as_json:
        console.print_json({"document": record.__dict__, "outputs": outputs})
    else:
        console.document_timeline(record, outputs)


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
        bool, typer.Option(help="Use job times and CPU measured in the last 15 minutes where there are any.")
    ] = True,
    check: Annotated[
        bool, typer.Option("--check", help="Compare the plan with what the pipeline measured, per phase.")
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Capacity per phase: throughput, bottleneck, latency, burst drain, CPU and RAM; what-ifs with --set."""
    from levers.planning.capacity import parse_rate
    from levers.planning.views import PlanFormat, render
    from levers.planning.whatif import observe, plan_report
    from levers.server.project import pipeline_path

    if fmt not in PlanFormat.__members__:
        raise UsageError(f"unknown format {fmt!r}", fix="use --format table or --format markdown")
    if check and not measured:
        raise UsageError("--check compares with measured figures", fix="leave out --no-measured")
    arrival = parse_rate(rate) if rate is not None else None
    path = pipeline_path(file)
    figures, hosts = observe(path, measured)
    report = plan_report(path, assignments or [], base, burst, arrival, figures, hosts, check)
    if as_json:
        console.print_json(report.as_json())
    else:
        # soft wrap: a markdown table row must stay one line, however wide the terminal
        console.out.print(render(report, PlanFormat(fmt)), soft_wrap=fmt == PlanFormat.markdown)
