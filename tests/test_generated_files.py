"""The committed files that levers generates stay equal to what it generates now."""

from __future__ import annotations

import json
import re
from pathlib import Path

from typer.testing import CliRunner

from levers.cli.app import app
from levers.pipeline.loading import load_pipeline
from levers.pipeline.procfile import render_procfile
from levers.pipeline.schema import pipeline_schema

ROOT = Path(__file__).resolve().parent.parent


def test_committed_schema_equals_levers_schema() -> None:
    committed = json.loads((ROOT / "pipeline.schema.json").read_text())
    assert committed == pipeline_schema()


def test_pipeline_yaml_points_editors_at_the_schema() -> None:
    first_line = (ROOT / "pipeline.yaml").read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=./pipeline.schema.json"


def test_committed_procfile_equals_levers_procfile() -> None:
    """Made for Heroku's fixed 30 s stop: each supervisor requeues what still runs after 25 s."""
    spec = load_pipeline(ROOT / "pipeline.yaml").spec
    assert (ROOT / "Procfile").read_text() == render_procfile(spec, grace_s=25)


def test_procfile_runs_each_phase_as_its_own_process_type() -> None:
    phases = load_pipeline(ROOT / "pipeline.yaml").spec.phases
    result = CliRunner().invoke(app, ["procfile", "-f", str(ROOT / "pipeline.yaml")])
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert result.exit_code == 0
    path = ROOT / "pipeline.yaml"
    assert lines == [f"{phase}: exec levers up -f {path} --phase {phase}" for phase in phases]


def test_procfile_grace_reaches_every_levers_up() -> None:
    result = CliRunner().invoke(app, ["procfile", "-f", str(ROOT / "pipeline.yaml"), "--grace", "25"])
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    assert result.exit_code == 0
    assert all(" --grace 25 --phase " in line for line in lines)
    refused = CliRunner().invoke(app, ["procfile", "-f", str(ROOT / "pipeline.yaml"), "--grace", "-5"])
    assert refused.exit_code == 2


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Quickstart\n+```bash\n(.*?)```", readme, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text().splitlines()
