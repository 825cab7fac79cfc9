"""`levers failed`, `retry` and `purge`: the documents that failed, and what to do with them."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from levers.cli import console
from levers.cli.options import FileOption, JsonOption, reports_errors
from levers.errors import EXIT_BAD_INPUT, EXIT_FAILURE, UsageError

if TYPE_CHECKING:
    from levers.documents.failures import Failures

PhaseFilter = Annotated[
    str | None, typer.Option("--phase", "-p", metavar="PHASE", help="Only those that failed at this phase.")
]


def _failures(file: FileOption) -> Failures:
    from levers.documents.failures import Failures
    from levers.documents.store import project_store
    from levers.server.project import open_project

    project = open_project(file, last_good=True)
    return Failures(project.connection, project.loaded.spec, project_store(project.loaded))


@reports_errors
def failed(
    file: FileOption = None,
    phase: PhaseFilter = None,
    since: Annotated[
        str | None, typer.Option(metavar="DURATION", help="Only those that failed in the last 30m, 1h, 7d...")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """The failed documents kept (failed_ttl): id, names, phase, attempts, error, when."""
    from levers.documents.failures import parse_duration

    since_s = parse_duration(since, "--since") if since is not None else None
    found = _failures(file).listed(phase, since_s)
    if as_json:
        console.print_json([f.as_json() for f in found])
    else:
        console.failed_table(found)


@reports_errors
def retry(
    ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="ID", help="Failed documents' ids (unique prefixes will do)."),
    ] = None,
    every: Annotated[
        bool, typer.Option("--all", help="Every failed document kept (with --phase: at that phase).")
    ] = False,
    phase: PhaseFilter = None,
    file: FileOption = None,
) -> None:
    """Requeue failed documents at the phase where each failed, keeping what earlier phases made."""
    if every == bool(ids):
        raise UsageError("retry takes ids or --all", fix="e.g. levers retry 3f2a9c1b or levers retry --all")
    if phase is not None and not every:
        raise UsageError("--phase goes with --all", fix="levers retry --all --phase PHASE")
    failures = _failures(file)
    outcomes = failures.retry(failures.ids(phase) if every else ids or [])
    console.retried(outcomes)
    if any(o.error for o in outcomes):
        raise typer.Exit(EXIT_BAD_INPUT if any(o.bad_input for o in outcomes) else EXIT_FAILURE)


@reports_errors
def purge(
    failed_only: Annotated[bool, typer.Option("--failed", help="Purge failed documents (required).")] = False,
    older_than: Annotated[
        str | None, typer.Option(metavar="DURATION", help="Only those failed longer ago than 30d, 12h...")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do it without asking.")] = False,
    file: FileOption = None,
) -> None:
    """Forget failed documents: their records, bytes and stored files."""
    from levers.documents.failures import parse_duration

    if not failed_only:
        raise UsageError("purge removes failed documents only", fix="levers purge --failed")
    older_than_s = parse_duration(older_than, "--older-than") if older_than is not None else 0.0
    failures = _failures(file)
    count = failures.due(older_than_s)
    if count == 0:
        console.note("no failed document to purge")
        return
    what = f"{count} failed document(s)" + (f" older than {older_than}" if older_than else "")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"purging {what} needs confirmation; input is not a terminal", fix="add --yes")
        if not typer.confirm(f"purge {what}: records, bytes and stored files?", err=True):
            console.note("nothing purged")
            raise typer.Exit(EXIT_FAILURE)
    console.note(f"purged {failures.purge(older_than_s)} failed document(s)")
