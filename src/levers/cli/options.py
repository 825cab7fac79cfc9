"""What every command shares: the pipeline-file and JSON options, and errors shown as one line."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from levers.cli import console
from levers.errors import LeversError

FileOption = Annotated[
    Path | None,
    typer.Option("--file", "-f", help="The pipeline file (default: $LEVERS_FILE, else ./pipeline.yaml)."),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


class Priority(StrEnum):
    """The lanes of levers.keys.LANES, as the CLI offers them."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


PriorityOption = Annotated[
    Priority,
    typer.Option(
        help="The documents' lane in every phase: workers take high before normal before low "
        "(a lower lane keeps a minimum share, lanes.min_share)."
    ),
]

KeepVersionsOption = Annotated[
    bool,
    typer.Option(
        "--keep-versions",
        help="A document that is a new version of a name submitted before leaves what the older "
        "versions wrote (in the knowledge graph, say); by default it replaces it.",
    ),
]

NoReuseOption = Annotated[
    bool,
    typer.Option(
        "--no-reuse",
        help="Every phase does the work, even where a stored result of the same input, code and "
        "settings would do (documents already done run again).",
    ),
]

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
