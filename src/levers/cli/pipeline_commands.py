"""`levers validate`, `schema`, `procfile`, `deploy k8s`, `set` and `get`: the pipeline file and what
comes from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
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
    from levers.server.pipeline_file import pipeline_path

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
    from levers.server.pipeline_file import pipeline_path

    sys.stdout.write(render_procfile(load_pipeline(pipeline_path(file)).spec, file, grace))


deploy_app = typer.Typer(
    help="Write what a platform needs to run the pipeline: Kubernetes manifests.", no_args_is_help=True
)


@deploy_app.command("k8s")
@reports_errors
def deploy_k8s(
    file: FileOption = None,
    image: Annotated[
        str, typer.Option(metavar="IMAGE", help="The container image with levers and the project at /app.")
    ] = "levers:latest",
    namespace: Annotated[
        str | None, typer.Option(metavar="NS", help="The namespace (default: kubectl's current one).")
    ] = None,
    secret: Annotated[
        str | None,
        typer.Option(
            metavar="NAME",
            help="The Secret holding REDIS_URL and the API keys (default: the pipeline's name).",
        ),
    ] = None,
    keda: Annotated[
        bool, typer.Option("--keda", help="Add a KEDA ScaledObject per phase, scaling its pods on its queue.")
    ] = False,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", metavar="DIR", help="Write one file per object into DIR (default: stdout)."
        ),
    ] = None,
) -> None:
    """Print Kubernetes manifests: a Deployment per phase (one worker per pod), the pipeline.yaml
    ConfigMap, and with --keda a ScaledObject per phase."""
    from levers.pipeline.kubernetes import Target, manifests, read_deployable, render, write_manifests
    from levers.server.pipeline_file import pipeline_path

    spec, text = read_deployable(pipeline_path(file))
    made = manifests(spec, text, Target(image, namespace, secret, keda))
    if output is None:
        sys.stdout.write(render(made.objects))
    else:
        write_manifests(made.objects, output)
        console.note(f"wrote {len(made.objects)} manifests to {output}")
    for note in made.notes:
        console.note(note)
    needed = "REDIS_URL, and REDIS_ADDRESS (host:port) and REDIS_PASSWORD for KEDA" if keda else "REDIS_URL"
    console.note(f"the pods read Secret {made.secret!r}: create it with {needed}, and the phases' API keys")


@reports_errors
def set_levers(
    assignments: Annotated[
        list[str],
        typer.Argument(metavar="KEY=VALUE...", help="e.g. chunking.semaphore=15 extraction.workers=5"),
    ],
    file: FileOption = None,
    pipeline: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Without a pipeline file: which pipeline published on REDIS_URL."),
    ] = None,
) -> None:
    """Change settings in pipeline.yaml, keeping its comments and layout, and publish them: every
    supervisor on every host follows, and their workers."""
    from levers.observing.applying import await_supervisors
    from levers.server.setting import set_anywhere

    outcome, connection = set_anywhere(file, assignments, pipeline)
    if outcome.caught_up is not None:
        console.note(f"pipeline.yaml was an older version: brought up to the published "
                     f"{outcome.caught_up.label} first ({'; '.join(outcome.behind)})")  # fmt: skip
    if not outcome.changes:
        console.note("nothing changed")
        return
    console.changes(outcome.changes)
    publication = outcome.publication
    if publication is None:
        from levers.server.connection import configured_url

        embedded = configured_url(outcome.updated) is None
        console.note(
            "the embedded server is not running: `levers up` starts with this file"
            if embedded
            else "not published: the pipeline's Redis does not answer; this file alone has the change"
        )
        return
    console.note(f"published as version {publication.version.label}")
    console.applied(await_supervisors(outcome.updated, connection))


@reports_errors
def get(
    key: Annotated[str, typer.Argument(help="e.g. chunking.semaphore or phases.chunking.timeout")],
    file: FileOption = None,
    pipeline: Annotated[
        str | None,
        typer.Option(metavar="NAME", help="Without a pipeline file: which pipeline published on REDIS_URL."),
    ] = None,
) -> None:
    """Print one setting's effective value (defaults included)."""
    read_only.get(key, file, pipeline)
