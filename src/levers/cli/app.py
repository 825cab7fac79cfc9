"""The `levers` command. Thin: each command parses its options, calls one module, and prints.

The commands live in modules by what they work on; this one puts them together.
"""

from __future__ import annotations

from typing import Annotated

import typer

from levers.cli import failure_commands, graph, observe_commands, pipeline_commands, run_commands
from levers.cli.help_text import plain_metavars

plain_metavars()
app = typer.Typer(
    help="Run a phased document pipeline on RQ workers, its parallelism declared in pipeline.yaml.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _print_version(asked: bool) -> None:
    if asked:
        from importlib.metadata import version

        typer.echo(f"levers {version('levers')}")
        raise typer.Exit()


@app.callback()
def main(
    show_version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print levers' version and exit."
        ),
    ] = False,
) -> None:
    """Run a phased document pipeline on RQ workers, its parallelism declared in pipeline.yaml."""


app.command()(pipeline_commands.validate)
app.command()(pipeline_commands.schema)
app.command()(pipeline_commands.procfile)
app.command()(run_commands.up)
app.command()(run_commands.url)
app.command()(run_commands.down)
app.command()(run_commands.submit)
app.command()(run_commands.run)
app.command("set")(pipeline_commands.set_levers)
app.command()(pipeline_commands.get)
app.command()(observe_commands.status)
app.command()(observe_commands.advise)
app.command()(observe_commands.show)
app.command()(observe_commands.plan)
app.command()(failure_commands.failed)
app.command()(failure_commands.retry)
app.command()(failure_commands.purge)
app.add_typer(pipeline_commands.deploy_app, name="deploy")
app.add_typer(graph.graph_app, name="graph")
