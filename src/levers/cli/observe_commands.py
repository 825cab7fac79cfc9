"""`levers status`, `advise`, `show` and `plan`: where the pipeline stands and what it can do."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from levers.cli import console, read_only
from levers.cli.options import FileOption, JsonOption, reports_errors


@reports_errors
def status(
    file: FileOption = None,
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every second.")] = False,
    pipeline: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Without a pipeline file: which pipeline published on REDIS_URL."),
    ] = None,
) -> None:
    """Per phase: queued, running, done, failed, and workers alive/desired."""
    read_only.status(file, as_json, watch, pipeline)


@reports_errors
def advise(file: FileOption = None, as_json: JsonOption = False) -> None:
    """Check live figures against the known symptoms; each finding says which lever to move."""
    from levers.observing.advice import advise as find
    from levers.observing.status import pipeline_status
    from levers.server.project import open_project

    project = open_project(file, last_good=True)
    findings = find(pipeline_status(project.connection, project.loaded.outline, project.file_error))
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
    read_only.show(doc_id, file, as_json)


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
    read_only.plan(file, assignments or (), base, burst, rate, fmt, measured, check, as_json)
