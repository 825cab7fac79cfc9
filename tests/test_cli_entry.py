"""The `levers` entry point's quick path: read-only commands parsed without the Typer app read
their options exactly as the app does, leave every form they are unsure of to the app, and fail
with the app's lines and exit codes."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer.main

from levers.cli import read_only
from levers.cli.app import app
from levers.cli.entry import SHAPES, parse, quick_call
from tests.conftest import make_project

# The Typer app as its console script ran it before the quick path, for comparison.
APP = [sys.executable, "-c", "from levers.cli.app import app; app(prog_name='levers')"]
QUICK = [sys.executable, "-m", "levers"]

FORMS = [
    ("status",),
    ("status", "--json"),
    ("status", "-w", "--json", "-f", "other.yaml"),
    ("status", "--watch", "--file=a b.yaml"),
    ("status", "--file", "a.yaml", "--file", "b.yaml"),  # given twice: the last counts
    ("status", "--json", "--json"),
    ("status", "--json", "--pipeline", "ingest"),
    ("show", "abc123"),
    ("show", "--json", "abc123", "-f", "p.yaml"),
    ("get", "chunking.semaphore"),
    ("get", "--file", "p.yaml", "phases.chunking.levers.workers"),
    ("get", "x=y"),
    ("get", "--pipeline", "ingest", "chunking.semaphore"),
    ("plan",),
    ("plan", "--json", "--check"),
    ("plan", "--no-measured", "--format", "markdown", "--burst", "1000", "--rate", "10/hour"),
    ("plan", "--set", "a.workers=2", "--set=b.semaphore=4", "--base", "main.yaml", "--measured"),
    ("plan", "--burst", "+7", "--format=table"),
]


def app_params(argv: tuple[str, ...]) -> dict[str, Any]:
    """The parameters the Typer app's command receives for ``argv``."""
    command = typer.main.get_command(app).commands[argv[0]]  # type: ignore[attr-defined]
    params = dict(command.make_context(argv[0], list(argv[1:])).params)
    if argv[0] == "plan":
        params["assignments"] = list(params["assignments"] or [])
    return params


def quick_params(argv: tuple[str, ...]) -> dict[str, Any]:
    """The parameters the quick path passes to ``read_only``, its defaults filled in."""
    values = parse(SHAPES[argv[0]], argv[1:])
    assert values is not None, f"{argv} goes to the app"
    function = getattr(read_only, argv[0])
    defaults = {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    params = {**defaults, **values}
    if argv[0] == "plan":
        params["assignments"] = list(params["assignments"])
    return params


@pytest.mark.parametrize("argv", FORMS, ids=" ".join)
def test_the_quick_path_reads_a_form_as_the_app_does(argv: tuple[str, ...]) -> None:
    assert quick_params(argv) == app_params(argv)


@pytest.mark.parametrize(
    "argv",
    [
        (),
        ("--version",),
        ("status", "--help"),
        ("status", "-f"),  # no value
        ("status", "--file="),
        ("status", "-f", "--json"),  # the app would take --json as the file's name
        ("status", "-wf", "p.yaml"),  # short flags run together
        ("status", "--json=yes"),
        ("status", "--", "extra"),
        ("status", "extra"),
        ("status", "--jso"),  # click takes no abbreviation
        ("show",),  # the id is missing
        ("show", "a", "b"),
        ("get", "-x"),
        ("plan", "--burst", "0"),  # below the app's minimum
        ("plan", "--burst", "many"),
        ("plan", "--set"),
        ("submit", "docs"),
        ("advise", "--json"),
    ],
    ids=lambda argv: " ".join(argv) or "no arguments",
)
def test_a_form_the_quick_path_is_unsure_of_goes_to_the_app(argv: tuple[str, ...]) -> None:
    assert quick_call(list(argv)) is None


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_every_spelling_the_quick_path_knows_is_the_apps(name: str) -> None:
    """An option renamed in the app and not here would otherwise be read by the quick path alone."""
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    spelt = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
    shape = SHAPES[name]
    assert set(shape.flags) | set(shape.options) | set(shape.many) <= spelt


def run(command: list[str], *args: str, cwd: Path) -> tuple[int, str, str]:
    env = {**os.environ, "REDIS_URL": "", "COLUMNS": "200"}
    done = subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("get", "phases.first.levers.workers"),
        ("get", "phases"),
        ("get", "nosuch.workers"),  # exit 2, a did-you-mean
        ("get", "first.workers", "-f", "missing.yaml"),  # no pipeline file
        ("status", "--json"),  # no server runs: exit 1, one line
        ("show", "abc", "--json"),
        ("plan", "--format", "html"),
        ("plan", "--check", "--no-measured"),
    ],
    ids=" ".join,
)
def test_the_quick_path_answers_as_the_app_does(tmp_path: Path, args: tuple[str, ...]) -> None:
    root = make_project(tmp_path, docs=0)

    assert run(QUICK, *args, cwd=root) == run(APP, *args, cwd=root)


def test_a_broken_pipeline_file_is_one_located_line_on_the_quick_path(tmp_path: Path) -> None:
    root = make_project(tmp_path, docs=0)
    assert run(QUICK, "get", "first.workers", cwd=root)[0] == 0  # a valid version read and recorded
    text = (root / "pipeline.yaml").read_text()
    (root / "pipeline.yaml").write_text(text.replace("workers: 2", "workers: -3", 1))

    code, out, err = run(QUICK, "get", "first.workers", cwd=root)

    assert (code, out) == (2, "")
    assert err.startswith("error: pipeline.yaml:") and "workers" in err and len(err.splitlines()) == 1
    assert (code, out, err) == run(APP, "get", "first.workers", cwd=root)
