"""The `levers` command's entry point: read-only commands answer without building the whole CLI.

Building the Typer app (Typer, rich and every command's options) costs more than `levers status`
does once it runs. So the common forms of `status`, `show`, `get` and `plan` are parsed here and
answered by ``levers.cli.read_only``, which the app's commands call too. Anything else, and
anything this parser is not sure of (--help, an option it does not know, a value that looks like
an option, a missing argument), goes to the Typer app: every form behaves, and fails, as the app
says.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from levers.errors import EXIT_FAILURE, LeversError

# The app's exit code for a command interrupted (Ctrl-C), with nothing printed: 128 + SIGINT.
EXIT_INTERRUPTED = 130


def positive(text: str) -> int:
    """`--burst`: a whole number of at least 1 (anything else is for the app to refuse)."""
    number = int(text)
    if number < 1:
        raise ValueError(text)
    return number


@dataclass(frozen=True)
class Shape:
    """A read-only command's parameters as the Typer app declares them. ``flags``: spelling ->
    (parameter, value); ``options``: spelling -> parameter, for those that take a value, which
    ``convert`` turns into the parameter's type; ``many``: options that may repeat, collected in
    a list; ``arguments``: the positional ones, in order, all required."""

    flags: dict[str, tuple[str, bool]] = field(default_factory=dict)
    options: dict[str, str] = field(default_factory=dict)
    many: dict[str, str] = field(default_factory=dict)
    arguments: tuple[str, ...] = ()
    convert: Mapping[str, Callable[[str], Any]] = field(default_factory=dict)


_FILE = {"--file": "file", "-f": "file"}
_JSON = {"--json": ("as_json", True)}
_PATH: dict[str, Callable[[str], Any]] = {"file": Path}
SHAPES = {
    "status": Shape(
        flags={**_JSON, "--watch": ("watch", True), "-w": ("watch", True)},
        options={**_FILE, "--pipeline": "pipeline"},
        convert=_PATH,
    ),
    "show": Shape(flags=_JSON, options=_FILE, arguments=("doc_id",), convert=_PATH),
    "get": Shape(options={**_FILE, "--pipeline": "pipeline"}, arguments=("key",), convert=_PATH),
    "plan": Shape(
        flags={
            **_JSON,
            "--check": ("check", True),
            "--measured": ("measured", True),
            "--no-measured": ("measured", False),
        },
        options={**_FILE, "--base": "base", "--burst": "burst", "--rate": "rate", "--format": "fmt"},
        many={"--set": "assignments"},
        convert={**_PATH, "base": Path, "burst": positive},
    ),
}


def parse(shape: Shape, args: Sequence[str]) -> dict[str, Any] | None:
    """The parameters ``args`` give, as click would read them; None when unsure."""
    values: dict[str, Any] = {}
    positional: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        name, equals, attached = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if arg in shape.flags:
            parameter, flag = shape.flags[arg]
            values[parameter] = flag
        elif name in shape.options or name in shape.many:
            if not equals and not rest:
                return None
            value = attached if equals else rest.pop(0)
            if not value or value.startswith("-"):
                return None
            if name in shape.many:
                values.setdefault(shape.many[name], []).append(value)
            else:
                values[shape.options[name]] = value  # given twice, the last counts
        elif arg.startswith("-"):
            return None
        else:
            positional.append(arg)
    if len(positional) != len(shape.arguments):
        return None
    values.update(zip(shape.arguments, positional, strict=True))
    try:
        return {name: shape.convert.get(name, str)(value) if isinstance(value, str) else value
                for name, value in values.items()}  # fmt: skip
    except ValueError:
        return None


def quick_call(argv: Sequence[str]) -> Callable[[], None] | None:
    """The read-only command ``argv`` asks for, ready to run, or None for the Typer app."""
    if not argv or argv[0] not in SHAPES:
        return None
    values = parse(SHAPES[argv[0]], argv[1:])
    if values is None:
        return None
    from levers.cli import read_only

    command = getattr(read_only, argv[0])
    return lambda: command(**values)


def answer(call: Callable[[], None]) -> int:
    """Run a read-only command as the app runs its commands: errors as one line, exit codes as its."""
    try:
        call()
    except LeversError as exc:
        from levers.cli import console

        console.error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (`levers status --json | head`), as the app takes it: exit 1, and
        # nothing left for Python to flush into the closed pipe at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    return 0


def main() -> None:
    call = quick_call(sys.argv[1:])
    if call is None:
        from levers.cli.app import app

        app(prog_name="levers")
    else:
        sys.exit(answer(call))
