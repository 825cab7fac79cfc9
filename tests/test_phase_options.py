"""Phase options are checked like the rest of pipeline.yaml, against the model a handler's module
declares: by `levers validate`, by `levers set`, and by a running pipeline following the file."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from levers.cli.app import app
from levers.pipeline.schema import BUNDLED_HANDLERS, pipeline_schema
from tests.conftest import StartLevers, levers, stop, wait_until

ROOT = Path(__file__).resolve().parent.parent

OWN_PHASE = """
from levers import PhaseContext, PhaseOptions


class Options(PhaseOptions):
    top: int = 10
    label: str = "words"


def count(doc, ctx: PhaseContext[Options]):
    return {"top": ctx.options.top, "options": type(ctx.options).__name__}
"""

OWN_PIPELINE = """\
name: {name}
phases:
  count:
    handler: ownphase:count
    accepts: [.txt]
    levers: {{workers: 1}}
    options:
      top: 3
"""


def bundled_pipeline(tmp_path: Path, old: str, new: str) -> Path:
    """The project's pipeline.yaml with one edit, in ``tmp_path``."""
    text = (ROOT / "pipeline.yaml").read_text()
    assert old in text
    (tmp_path / "pipeline.yaml").write_text(text.replace(old, new, 1))
    return tmp_path


def problems(stderr: str) -> list[str]:
    return [line.removeprefix("error: ") for line in stderr.splitlines() if line.startswith("error: ")]


def located(path: Path, line_with: str, at: str) -> str:
    """``pipeline.yaml:LINE:COL`` of ``at`` on the first line holding ``line_with``, 1-based."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line_with in line:
            return f"{path.name}:{number}:{line.index(at) + 1}"
    raise AssertionError(f"{line_with!r} not in {path}")


@pytest.mark.parametrize(
    ("old", "new", "at", "message"),
    [
        ("chunk_tokens: 400", "chunk_token: 400", "chunk_token",
         "unknown key 'phases.chunking.options.chunk_token'; did you mean 'chunk_tokens'?"),
        ("      group_id: levers", "      base_url: http://localhost:9\n      group_id: levers", "base_url",
         "unknown key 'phases.kg_ingest.options.base_url'; did you mean 'anthropic_base_url'?"),
        ("chunk_tokens: 400", "chunk_tokens: '400'", "'400'",
         "phases.chunking.options.chunk_tokens: expected a whole number, not '400'"),
        ("max_pages: 2000", "max_pages: true", "true",
         "phases.extraction.options.max_pages: expected a whole number, not true"),
        ("smart_format: true", "smart_format: 1", "1",
         "phases.transcription.options.smart_format: expected true or false, not 1"),
        ("chunk_tokens: 400", "chunk_tokens: 4", "4",
         "phases.chunking.options.chunk_tokens: 4 is below the bound of 16; set at least 16"),
        ("overlap_tokens: 50", "overlap_tokens: 500", "chunk_tokens",
         "phases.chunking.options: overlap_tokens (500) must be under chunk_tokens (400)"),
        ("llm: auto", "llm: openai", "openai",
         "phases.kg_ingest.options.llm: 'openai' is not one of 'auto', 'anthropic' or 'none'"),
        ("chunk_tokens: 400", "colour: red", "colour", "unknown key 'phases.chunking.options.colour'"),
    ],
)  # fmt: skip
def test_validate_locates_a_bad_bundled_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: str, new: str, at: str, message: str
) -> None:
    root = bundled_pipeline(tmp_path, old, new)
    monkeypatch.chdir(root)

    result = CliRunner().invoke(app, ["validate"])

    assert result.exit_code == 2
    line_with = new.splitlines()[0] if at != "chunk_tokens" else "chunk_tokens: 400"
    assert problems(result.stderr) == [f"{located(root / 'pipeline.yaml', line_with, at)}: {message}"]


def test_a_misspelt_option_exits_2_from_the_command(tmp_path: Path) -> None:
    root = bundled_pipeline(tmp_path, "chunk_tokens: 400", "chunk_token: 400")
    result = levers("validate", cwd=root)
    assert result.returncode == 2
    assert problems(result.stderr) == [
        f"{located(root / 'pipeline.yaml', 'chunk_token:', 'chunk_token')}: "
        "unknown key 'phases.chunking.options.chunk_token'; did you mean 'chunk_tokens'?"
    ]
    assert "Traceback" not in result.stderr


@pytest.fixture
def own_project(tmp_path: Path) -> Path:
    (tmp_path / "ownphase.py").write_text(OWN_PHASE)
    (tmp_path / "pipeline.yaml").write_text(OWN_PIPELINE.format(name=f"opts{tmp_path.name[-6:]}"))
    (tmp_path / "docs").mkdir()
    for name in ("a", "b", "c"):
        (tmp_path / "docs" / f"{name}.txt").write_text(f"document {name}\n")
    return tmp_path


def test_validate_checks_the_options_of_a_users_own_module(own_project: Path) -> None:
    pipeline = own_project / "pipeline.yaml"
    pipeline.write_text(pipeline.read_text().replace("top: 3", "tpo: 3\n      label: 7"))

    result = levers("validate", cwd=own_project)

    assert result.returncode == 2
    assert problems(result.stderr) == [
        f"{located(pipeline, 'tpo', 'tpo')}: unknown key 'phases.count.options.tpo'; did you mean 'top'?",
        f"{located(pipeline, 'label', '7')}: phases.count.options.label: Input should be a valid string",
    ]


def test_an_options_name_that_is_not_a_model_is_reported_at_the_handler(own_project: Path) -> None:
    module = own_project / "ownphase.py"
    module.write_text(module.read_text() + "\nOptions = {'top': 10}\n")
    result = levers("validate", cwd=own_project)
    assert result.returncode == 2
    handler_at = located(own_project / "pipeline.yaml", "handler: ownphase", "handler")
    assert problems(result.stderr) == [f"{handler_at}: ownphase.Options is not a pydantic model"]


def test_set_refuses_a_bad_option_and_writes_nothing(own_project: Path) -> None:
    pipeline = own_project / "pipeline.yaml"
    before = pipeline.read_bytes()

    misspelt = levers("set", "count.options.tpo=5", cwd=own_project)
    mistyped = levers("set", "count.options.top=many", cwd=own_project)

    assert misspelt.returncode == 2 and mistyped.returncode == 2
    top_at = located(pipeline, "top: 3", "3")
    # where the edit would have put the new key: after top, on the next line
    assert problems(misspelt.stderr) == [
        "pipeline.yaml:9:7: unknown key 'phases.count.options.tpo'; did you mean 'top'?"
    ]
    assert problems(mistyped.stderr) == [
        f"{top_at}: phases.count.options.top: expected a whole number, not 'many'"
    ]
    assert pipeline.read_bytes() == before


def output(root: Path, doc_id: str) -> dict[str, object] | None:
    path = root / ".levers" / "artifacts" / doc_id / "count.json"
    return json.loads(path.read_text()) if path.exists() else None


@pytest.fixture
def running(own_project: Path, redis_url: str, start_levers: StartLevers) -> Iterator[Path]:
    supervisor = start_levers("up", cwd=own_project)
    yield own_project
    stop(supervisor)


def processed(root: Path, name: str) -> dict[str, object]:
    submitted = levers("submit", f"docs/{name}", cwd=root)
    assert submitted.returncode == 0, submitted.stderr
    doc_id = submitted.stdout.split()[0]
    wait_until(lambda: output(root, doc_id) is not None, timeout_s=60)
    result = output(root, doc_id)
    assert result is not None
    return result


def test_a_running_pipeline_takes_a_valid_options_edit_and_never_a_bad_one(running: Path) -> None:
    pipeline = running / "pipeline.yaml"
    assert processed(running, "a.txt") == {"top": 3, "options": "Options"}

    edited = levers("set", "count.options.top=5", cwd=running)
    assert edited.returncode == 0, edited.stderr
    assert processed(running, "b.txt") == {"top": 5, "options": "Options"}

    # written by hand, past `levers set`: the supervisor and its worker keep the last good version
    pipeline.write_text(pipeline.read_text().replace("top: 5", "top: 'seven'"))
    wait_until(lambda: "phases.count.options.top" in (status(running)["config_error"] or ""))
    assert processed(running, "c.txt") == {"top": 5, "options": "Options"}


def status(root: Path) -> dict[str, str | None]:
    result = levers("status", "--json", cwd=root)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


def test_the_schema_describes_each_bundled_phases_options() -> None:
    schema = pipeline_schema()
    branches = {
        branch["if"]["properties"]["handler"]["const"]: branch["then"]["properties"]["options"]["$ref"]
        for branch in schema["$defs"]["Phase"]["allOf"]
    }
    chunking = schema["$defs"][branches["phases.chunking:chunk"].removeprefix("#/$defs/")]
    kg = schema["$defs"][branches["phases.kg_ingest:ingest_graph"].removeprefix("#/$defs/")]

    # every handler levers ships, the bundled pipeline's among them (kg_ingest's two: one document
    # at a time, or batches)
    assert set(branches) == set(BUNDLED_HANDLERS)
    assert set(branches) >= {
        f"{m}:{f}"
        for m, f in re.findall(r"handler: (phases\.\w+):(\w+)", (ROOT / "pipeline.yaml").read_text())
    }
    assert chunking["additionalProperties"] is False
    assert {"chunk_tokens", "overlap_tokens", "context_provider", "anthropic_base_url"} <= set(
        chunking["properties"]
    )
    assert chunking["properties"]["chunk_tokens"]["minimum"] == 16
    assert "anthropic_base_url" in kg["properties"] and "base_url" not in kg["properties"]
