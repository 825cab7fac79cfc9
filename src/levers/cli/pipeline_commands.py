"""`levers validate`, `schema`, `procfile`, `set` and `get`: the pipeline file and what comes from it."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from levers.cli import console, read_only
from levers.cli.options import FileOption, JsonOption, reports_errors
from levers.errors import EXIT_BAD_INPUT, SpecError
from levers.pipeline.model import MAX_TIMEOUT_S


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


def schema() -> None:
    """Print the JSON Schema of pipeline.yaml (editors use it to complete and check the file)."""
    from levers.pipeline.schema import pipeline_schema

    sys.stdout.write(json.dumps(pipeline_schema(), indent=2) + "\n")


@reports_errors
def procfile(
    file: FileOption = None,
    grace: Annotated[
        float | None,
        typer.Option(
            metavar="SECONDS",
            min=0,
            max=MAX_TIMEOUT_S,
            help="Give each `levers up` this --grace: a few seconds under the platform's (Heroku: 25).",
        ),
    ] = None,
) -> None:
    """Print a Procfile with one process type per phase, so a platform can scale each on its own."""
    from levers.pipeline.loading import load_pipeline
    from levers.pipeline.procfile import render_procfile
    from levers.server.project import pipeline_path

    sys.stdout.write(render_procfile(load_pipeline(pipeline_path(file)).spec, file, grace))


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


@reports_errors
def get(
    key: Annotated[str, typer.Argument(help="e.g. chunking.semaphore or phases.chunking.timeout")],
    file: FileOption = None,
) -> None:
    """Print one setting's effective value (defaults included)."""
    read_only.get(key, file)
